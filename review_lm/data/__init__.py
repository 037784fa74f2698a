"""Reviews in, prompts and training-ready samples out: the data model, validation, the chronological split, every
prompt text and file format, and the two dataset kinds (spec samples, one conversation per user).

Imports no torch at module level: the loader report and every data error answer without it.
"""
