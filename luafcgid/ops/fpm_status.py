"""The status page in php-fpm's forms (fpm_status.c), so that php-fpm's exporters and
dashboards read luafcgid's unchanged: plain text, ?json, ?xml, ?html and ?openmetrics, with
?full one entry per worker.

Pure: render() takes the pool's figures under php-fpm's names (HEADER), the workers'
entries under php-fpm's names (PROCESS) or None without ?full, and luafcgid's own figures
(`own`: a mapping for JSON, lines for the plain text, OpenMetrics lines), and returns the
content type and the body. Field names, their order, the types (integers where php-fpm has
integers: php-fpm_exporter decodes them into Go integers), the time formats and the state
names are php-fpm 8.2's.
"""

import json
import time

HEADER = ("pool", "process manager", "start time", "start since", "accepted conn",
          "listen queue", "max listen queue", "listen queue len", "idle processes",
          "active processes", "total processes", "max active processes",
          "max children reached", "slow requests")
PROCESS = ("pid", "state", "start time", "start since", "requests", "request duration",
           "request method", "request uri", "content length", "user", "script",
           "last request cpu", "last request memory")

TEXT_TIME = "%d/%b/%Y:%H:%M:%S %z"
FORMS = ("html", "xml", "json", "openmetrics")   # php-fpm's query keys, in its precedence
TYPES = {"text": "text/plain; charset=utf-8", "json": "application/json",
         "xml": "text/xml; charset=utf-8", "html": "text/html; charset=utf-8",
         "openmetrics": "application/openmetrics-text; version=1.0.0; charset=utf-8"}

# php-fpm's OpenMetrics families: name, type, help, the header field
_METRICS = (
    ("start_since", "counter", "The number of seconds since FPM has started.", "start since"),
    ("accepted_connections", "counter", "The number of requests accepted by the pool.",
     "accepted conn"),
    ("listen_queue", "gauge", "The number of requests in the queue of pending connections.",
     "listen queue"),
    ("max_listen_queue", "counter", "The maximum number of requests in the queue of pending "
     "connections since FPM has started.", "max listen queue"),
    ("listen_queue_length", "gauge", "The size of the socket queue of pending connections.",
     "listen queue len"),
    ("idle_processes", "gauge", "The number of idle processes.", "idle processes"),
    ("active_processes", "gauge", "The number of active processes.", "active processes"),
    ("total_processes", "gauge", "The number of idle + active processes.", "total processes"),
    ("max_active_processes", "counter", "The maximum number of active processes since FPM "
     "has started.", "max active processes"),
    ("max_children_reached", "counter", "The number of times, the process limit has been "
     "reached, when pm tries to start more children (works only for pm 'dynamic' and "
     "'ondemand').", "max children reached"),
    ("slow_requests", "counter", "The number of requests that exceeded your "
     "'request_slowlog_timeout' value.", "slow requests"),
)


def xml_escape(text):
    """Text for XML and HTML. (Not xml.sax.saxutils: importing it cost each process 7 MB.)"""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def form(query):
    """(form, full) that a status request's QUERY_STRING (bytes) asks for, by php-fpm's keys
    (present, whatever their value)."""
    keys = {pair.partition(b"=")[0].decode("latin-1") for pair in query.split(b"&")}
    chosen = next((name for name in FORMS if name in keys), "text")
    return chosen, "full" in keys


def _clock(epoch):
    return time.strftime(TEXT_TIME, time.localtime(epoch))


def _text(pool, processes, own):
    def block(fields, entry, labels=None):
        lines = []
        for name in fields:
            value = entry[name]
            if name == "start time":
                value = _clock(value)
            elif name == "last request cpu":
                value = "%.2f" % value
            label = (labels or {}).get(name, name) + ":"
            lines.append(f"{label:<22}{value}")
        return lines

    lines = block(HEADER, pool) + list(own)
    for entry in processes or ():
        lines += ["", "************************"]
        lines += block(PROCESS, entry, {"request uri": "request URI"})
    return "\n".join(lines) + "\n"


def _json(pool, processes, own):
    data = {name: pool[name] for name in HEADER}
    data.update(own)
    if processes is not None:
        data["processes"] = [{name: entry[name] for name in PROCESS} for entry in processes]
    return json.dumps(data, indent=1) + "\n"


def _xml(pool, processes):
    def tags(fields, entry):
        out = []
        for name in fields:
            value = entry[name]
            if name == "last request cpu":
                value = "%.2f" % value
            tag = name.replace(" ", "-")
            out.append(f"<{tag}>{xml_escape(str(value))}</{tag}>")
        return out

    lines = ['<?xml version="1.0" ?>', "<status>"] + tags(HEADER, pool)
    if processes is not None:
        lines.append("<processes>")
        lines += ["<process>" + "".join(tags(PROCESS, entry)) + "</process>"
                  for entry in processes]
        lines.append("</processes>")
    lines.append("</status>")
    return "\n".join(lines) + "\n"


def _html(pool, processes):
    def cell(name, value, tag="td"):
        if name == "start time":
            value = _clock(value)
        elif name == "last request cpu":
            value = "%.2f" % value
        return f"<{tag}>{xml_escape(str(value))}</{tag}>"

    lines = ["<!DOCTYPE html>", "<html><head><title>PHP-FPM Status Page</title></head>",
             "<body>", "<table>"]
    lines += [f"<tr><th>{name}</th>{cell(name, pool[name])}</tr>" for name in HEADER]
    lines.append("</table>")
    if processes is not None:
        lines.append('<table border="1">')
        lines.append("<tr>" + "".join(f"<th>{name}</th>" for name in PROCESS) + "</tr>")
        lines += ["<tr>" + "".join(cell(name, entry[name]) for name in PROCESS) + "</tr>"
                  for entry in processes]
        lines.append("</table>")
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


def _openmetrics(pool, own):
    """php-fpm's families with php-fpm's names, then luafcgid's own, then # EOF. php-fpm
    types some of them counter without the _total a counter's samples must end in, which a
    strict OpenMetrics parser refuses ("Clashing name"); here they are `unknown`, so the
    series keep php-fpm's names (what dashboards made for php-fpm query) in a valid text."""
    out = [f"# HELP phpfpm_up Could pool {pool['pool']} using a {pool['process manager']} PM "
           f"on PHP-FPM be reached?", "# TYPE phpfpm_up gauge", "phpfpm_up 1"]
    for name, kind, help_text, field in _METRICS:
        out += [f"# HELP phpfpm_{name} {help_text}",
                f"# TYPE phpfpm_{name} {'unknown' if kind == 'counter' else kind}",
                f"phpfpm_{name} {pool[field]}"]
    out += list(own)
    out.append("# EOF")
    return "\n".join(out) + "\n"


def render(chosen, pool, processes, own_json, own_text, own_metrics):
    """(content type, body bytes) of the status page in form `chosen` (form()'s): `pool`
    maps HEADER's names to values, `processes` is a list of mappings of PROCESS's names (or
    None without ?full); luafcgid's own figures follow php-fpm's, in JSON as the keys of
    `own_json`, in plain text as the lines `own_text`, in OpenMetrics as `own_metrics`."""
    if chosen == "json":
        body = _json(pool, processes, own_json)
    elif chosen == "xml":
        body = _xml(pool, processes)
    elif chosen == "html":
        body = _html(pool, processes)
    elif chosen == "openmetrics":
        body = _openmetrics(pool, own_metrics)
    else:
        body = _text(pool, processes, own_text)
    return TYPES[chosen], body.encode()
