"""Adapters added to ESPnet's ``--adapter`` choices (``adapter: saml``)."""
