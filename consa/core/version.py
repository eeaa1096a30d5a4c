"""The library's version: written into every manifest and printed by `consa --version`."""

__version__ = "0.1.0"
