"""The end-to-end promises (docs/guarantees.md): each module tests one, through the commands or the
stages, across packages."""
