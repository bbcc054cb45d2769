"""sam3-serve's HTTP layer: contracts, jobs, files, auth, configuration and the CLI."""
