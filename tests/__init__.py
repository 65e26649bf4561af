"""The test suite of calm-audio (a package, so tests import their helpers as `tests.helpers...`)."""
