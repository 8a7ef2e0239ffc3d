"""The benchmark: our figures next to the references that bound them, measured in one run."""
