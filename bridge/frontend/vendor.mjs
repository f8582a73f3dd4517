// Copies the built files of the locked npm packages into ../static/vendor, with their
// licences, and writes manifest.json (package -> version, file, licence) that the tests
// compare with package-lock.json. Run by `make frontend` after `npm ci`.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "..", "static", "vendor");
// package -> [the file the page imports, its name under static/vendor/<package>/]
const FILES = { cytoscape: ["dist/cytoscape.esm.min.mjs", "cytoscape.esm.min.js"] };

const manifest = {};
for (const [name, [source, target]] of Object.entries(FILES)) {
  const root = join(here, "node_modules", name);
  const info = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
  mkdirSync(join(vendor, name), { recursive: true });
  copyFileSync(join(root, source), join(vendor, name, target));
  copyFileSync(join(root, "LICENSE"), join(vendor, name, "LICENSE"));
  manifest[name] = { version: info.version, license: info.license, file: `${name}/${target}` };
}
writeFileSync(join(vendor, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);
console.log(`vendored ${Object.keys(manifest).join(", ")} into ${vendor}`);
