// Types for the backend's API, generated from its OpenAPI document:
//   node generate-types.mjs http://127.0.0.1:8000/openapi.json src/api/schema.d.ts
// As `openapi-typescript URL -o FILE --default-non-nullable false`, with binary bodies typed as
// Blob (the CLI types them as string): an upload takes a Blob, an image reply is a Blob.
import { writeFile } from "node:fs/promises";
import { pathToFileURL } from "node:url";
import openapiTS, { astToString } from "openapi-typescript";
import ts from "typescript";

const [source, output] = process.argv.slice(2);
if (!source || !output) {
  console.error("usage: node generate-types.mjs OPENAPI_URL_OR_FILE OUTPUT.d.ts");
  process.exit(2);
}
const BLOB = ts.factory.createTypeReferenceNode("Blob");
const NULL = ts.factory.createLiteralTypeNode(ts.factory.createNull());
const document = /^https?:/.test(source) ? new URL(source) : pathToFileURL(source);
const ast = await openapiTS(document, {
  // Request fields with a default may be left out (replies declare every field required).
  defaultNonNullable: false,
  transform(schema) {
    if (schema.format === "binary") {
      return schema.nullable ? ts.factory.createUnionTypeNode([BLOB, NULL]) : BLOB;
    }
    return undefined;
  },
});
await writeFile(output, astToString(ast));
