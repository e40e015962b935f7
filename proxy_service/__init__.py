"""proxy_service: stable, never-expiring image URLs in front of a private object-storage bucket."""

__version__ = "0.1.0"
