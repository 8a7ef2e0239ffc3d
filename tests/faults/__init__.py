"""Fault injection: real API, worker, PostgreSQL and S3 processes under a random schedule of failures,
with writers, readers and an operator recorded in a history that a pure checker holds against the contract."""
