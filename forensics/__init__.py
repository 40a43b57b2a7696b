"""Forensics: read CRIU checkpoints (process trees, files, sockets, memory) without restoring them.

images.py decodes CRIU's image files; memory.py maps dumped pages onto a process's address space.
Everything read here is treated as hostile: failures are ImageError lines, never tracebacks.
"""
