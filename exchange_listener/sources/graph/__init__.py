"""The Microsoft Graph mail source: an HTTP client, the workers' fetcher and the delta catch-up."""
