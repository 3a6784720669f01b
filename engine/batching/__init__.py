"""The running batch: rows of many jobs advanced together, their compiled graphs and static
buffers, and the admission policy that decides what joins."""
