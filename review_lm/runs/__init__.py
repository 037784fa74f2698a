"""The run folder: its file names and record, the fingerprint that says which run it holds, the lock that keeps it
to one run at a time, torchrun restarts, complete checkpoints and resume, disk space.

Imports no torch at module level.
"""
