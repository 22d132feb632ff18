"""Speaking to Smile ID: signed requests, the HTTP client, and the classification of every answer."""
