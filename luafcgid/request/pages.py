"""The responses luafcgid writes itself: error pages, as CGI response bytes."""

from html import escape

_PAGE = ("<!DOCTYPE html>\n<html><head><title>{title}</title></head>\n"
         "<body><h1>{title}</h1>\n{detail}</body></html>\n")


def response(status, detail="", extra_headers=()):
    """A complete CGI response: Status and Content-Type headers, then a small HTML page."""
    body = _PAGE.format(title=escape(status), detail=detail).encode()
    head = "".join(f"{line}\r\n" for line in extra_headers)
    return (f"Status: {status}\r\nContent-Type: text/html; charset=utf-8\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def not_found():
    """Names no path, whatever showerrors says (php-fpm: "File not found.")."""
    return response("404 Not Found", "<p>File not found.</p>\n")


def bad_request(detail):
    return response("400 Bad Request", f"<p>{escape(detail)}</p>\n")


def forbidden():
    return response("403 Forbidden", "<p>This script may not be run.</p>\n")


def too_large(limit):
    return response("413 Content Too Large",
                    f"<p>The request body is larger than {limit} bytes.</p>\n")


def server_error(kind=None, message=None):
    """500; the kind and Lua message are shown only when given (showerrors)."""
    if kind is None:
        return response("500 Internal Server Error")
    return response("500 Internal Server Error",
                    f"<h2>{escape(kind)}</h2>\n<pre>{escape(message)}</pre>\n")


def unavailable():
    return response("503 Service Unavailable", "<p>The server is shutting down.</p>\n")
