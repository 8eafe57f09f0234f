"""A Microsoft Graph emulator (mail, delta, change notifications, $batch) with an Entra-like token host."""
