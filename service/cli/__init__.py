"""The `profiles` command line: it sits above the API, the workers and the dev stack."""
