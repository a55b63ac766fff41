// Validate FHIR R4 JSON files with FHIR.js against the R4 structure definitions it ships.
// Usage: node validate.js FILE...   Each file holds a Bundle (every entry's resource is validated too) or a resource.
// Prints one JSON line: {"resources": N, "errors": [...], "warnings": N}; exits 1 when any error was found.
"use strict";
const fs = require("fs");
const { Fhir } = require("fhir");

const fhir = new Fhir();
let resources = 0;
let warnings = 0;
const errors = [];

function check(resource, where) {
  resources += 1;
  const result = fhir.validate(resource, { errorOnUnexpected: true });
  for (const m of result.messages) {
    if (m.severity === "error") errors.push(`${where} ${resource.resourceType}/${resource.id}: ${m.location}: ${m.message}`);
    else if (m.severity === "warning") warnings += 1;
  }
}

for (const file of process.argv.slice(2)) {
  const data = JSON.parse(fs.readFileSync(file, "utf8"));
  check(data, file);
  if (data.resourceType === "Bundle") {
    for (const entry of data.entry || []) check(entry.resource, file);
  }
}
process.stdout.write(JSON.stringify({ resources, errors, warnings }) + "\n");
process.exit(errors.length ? 1 : 0);
