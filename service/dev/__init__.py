"""`profiles dev` and the tests' engines: embedded PostgreSQL and SeaweedFS. Development only: only
the dev command and the tests import it."""
