"""The backup server and its clients: deduplicated, encrypted, immutable backup generations (docs/backup-server.md)."""
