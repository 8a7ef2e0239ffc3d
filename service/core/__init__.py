"""The shared core of the API and the workers: domain rules, settings, SQL, the blob store,
notifications, metrics and logs. It imports neither the API, the workers nor the command line."""
