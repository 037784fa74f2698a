"""The mechanisms behind the spec's scripts, one module per concern (see README.md, 文件说明)."""
