"""The `calm` commands, one module each: parse options, make the library call, print the result."""
