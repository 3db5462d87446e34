// Validate GLB files with the Khronos glTF validator; prints one JSON object per file:
// {"file", "errors", "warnings", "infos", "hints", "messages": [{code, severity, message, pointer}]}.
// Usage: node tests/js/validate_gltf.js FILE.glb ...   (needs `npm ci` in the repository root)
"use strict";
const fs = require("fs");
const validator = require("gltf-validator");

async function main() {
  for (const file of process.argv.slice(2)) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(file)), {
      uri: file,
      maxIssues: 100,
      format: "glb",
    });
    const issues = report.issues;
    console.log(JSON.stringify({
      file,
      errors: issues.numErrors,
      warnings: issues.numWarnings,
      infos: issues.numInfos,
      hints: issues.numHints,
      messages: issues.messages.map((m) => ({ code: m.code, severity: m.severity, message: m.message, pointer: m.pointer })),
    }));
  }
}

main().catch((e) => {
  console.error(String(e));
  process.exit(1);
});
