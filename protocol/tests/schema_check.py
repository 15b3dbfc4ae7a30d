#!/usr/bin/env python3
"""Validates the golden and invalid job fixtures against the committed JSON Schemas with
Python's jsonschema, independently of the Rust decoder: every golden job must be accepted and
every invalid fixture rejected (a message that is not JSON counts as rejected)."""
import json
import pathlib
import sys

import jsonschema

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
schema = json.loads((root / "protocol/schema/corral.job.v1.schema.json").read_text())
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)

problems = []
golden = sorted(p for p in (root / "fixtures/jobs").glob("*.json") if not p.name.endswith(".expect.json"))
for path in golden:
    errors = list(validator.iter_errors(json.loads(path.read_text())))
    if errors:
        problems.append(f"{path.name}: rejected by the schema: {errors[0].message}")

expected = json.loads((root / "fixtures/invalid/expected.json").read_text())
for name in sorted(expected):
    try:
        message = json.loads((root / "fixtures/invalid" / name).read_text())
    except json.JSONDecodeError:
        continue
    if validator.is_valid(message):
        problems.append(f"{name}: accepted by the schema, expected {expected[name]}")

for kind in ("result", "event", "log", "cancel"):
    other = json.loads((root / f"protocol/schema/corral.{kind}.v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(other)

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"schema and decoder agree: {len(golden)} golden jobs accepted, {len(expected)} invalid messages rejected")
