"""Schemathesis hooks for the CI API fuzz step (.ci/run).

`GET /v1/events?wait_ms=N` may legitimately block for up to 60 s when nothing matches; a
fuzz run that hit that often would take hours. Valid `wait_ms` values are scaled down to
at most 200 ms; out-of-range and non-integer values (negative tests) are left alone, so the
server's validation is still exercised.
"""

import schemathesis


@schemathesis.hook
def map_query(context, query):
    if not isinstance(query, dict) or "wait_ms" not in query:
        return query
    value = query["wait_ms"]
    if isinstance(value, bool):
        return query
    try:
        n = int(value)
    except (TypeError, ValueError):
        return query
    if str(n) == str(value).strip() and 200 < n <= 60000:
        query["wait_ms"] = n % 201
    return query


_validators = {}


def _log_event_validator(raw_schema):
    key = id(raw_schema)
    if key not in _validators:
        import jsonschema_rs

        root = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": "#/components/schemas/LogEvent",
            "components": raw_schema["components"],
        }
        _validators[key] = jsonschema_rs.validator_for(root)
    return _validators[key]


@schemathesis.check
def events_stream_conformance(ctx, response, case):
    """Every NDJSON line (or MessagePack map) of a 200 `GET /v1/events` is a `LogEvent`.

    Schemathesis validates JSON bodies itself but not streams, so this does it per event.
    """
    if case.operation.path != "/v1/events" or response.status_code != 200:
        return None
    ctype = response.headers.get("content-type", [""])
    ctype = (ctype[0] if isinstance(ctype, list) else ctype).split(";")[0].strip()
    if ctype == "application/x-ndjson":
        import json

        text = response.content.decode("utf-8")
        if text and not text.endswith("\n"):
            raise AssertionError("NDJSON body does not end with a newline")
        events = [json.loads(line) for line in text.splitlines()]
    elif ctype == "application/msgpack":
        import msgpack

        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(response.content)
        events = list(unpacker)
    else:
        raise AssertionError(f"unexpected content type {ctype!r}")
    validator = _log_event_validator(case.operation.schema.raw_schema)
    offs = []
    for ev in events:
        errors = [e.message for e in validator.iter_errors(ev)]
        if errors:
            raise AssertionError(f"event {ev!r} does not match LogEvent: {errors[:3]}")
        offs.append(ev["off"])
    if offs != sorted(set(offs)):
        raise AssertionError(f"offsets are not strictly increasing: {offs}")
    return None
