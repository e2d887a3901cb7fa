"""Built-in plug-ins, registered through the same hooks as installed ones."""
