"""Command Email Relay: an authenticated SMTP relay that enforces monthly send quotas."""
