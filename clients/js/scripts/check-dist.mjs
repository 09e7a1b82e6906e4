// The built files in dist/ are committed (the gateway embeds them with include_str!, so that
// `cargo build` needs no Node): this rebuilds them into a temporary directory and fails when
// the committed ones differ, naming the files (fix: `npm run build` and commit dist/).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = mkdtempSync(join(tmpdir(), "imgw-dist-"));
const files = (dir) =>
  readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? files(p) : [p];
  });
try {
  execFileSync(process.execPath, [join(root, "node_modules/typescript/bin/tsc"), "-p", root, "--outDir", out], {
    stdio: "inherit",
  });
  const fresh = files(out).map((p) => relative(out, p)).sort();
  const committed = files(join(root, "dist")).map((p) => relative(join(root, "dist"), p)).sort();
  const stale = [...new Set([...fresh, ...committed])].filter((f) => {
    try {
      return readFileSync(join(out, f), "utf8") !== readFileSync(join(root, "dist", f), "utf8");
    } catch {
      return true;
    }
  });
  if (stale.length > 0) {
    console.error(`clients/js/dist is out of date (${stale.join(", ")}): run npm run build and commit dist/`);
    process.exit(1);
  }
  console.log(`clients/js/dist matches its sources (${fresh.length} files)`);
} finally {
  rmSync(out, { recursive: true, force: true });
}
