"""The request path: from bytes on a FastCGI connection to a response."""
