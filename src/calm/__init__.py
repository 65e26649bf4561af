"""calm-audio: few-shot audio classification with class-conditional sparse attention vectors."""

__version__ = "0.1.0"
