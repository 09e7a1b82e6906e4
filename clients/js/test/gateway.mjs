// Starts a real `imgw serve --insecure-dev-auth` for the tests: every listener on port 0, the
// bound addresses read back from --ports-file, ready once GET /readyz answers 200. Every wait
// is bounded; the gateway is killed when the test process exits.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../..");

/** The imgw binary: $IMGW_BIN, else $CARGO_TARGET_DIR/debug/imgw, else target/debug/imgw. */
export function imgwBin() {
  if (process.env.IMGW_BIN) return process.env.IMGW_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(repo, "target");
  return join(target, "debug", "imgw");
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` (sync or async) every 20 ms until it returns a truthy value; throws after
 * `ms` naming `what`. */
export async function waitFor(check, ms, what) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

const running = new Set();
process.on("exit", () => {
  for (const p of running) p.kill("SIGKILL");
});

/** Starts a gateway. `dataDir`: keep the store there (to restart over it); `args`: more flags. */
export async function startGateway({ args = [], dataDir } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "imgw-js-"));
  const data = dataDir ?? join(dir, "data");
  const portsFile = join(dir, "ports.json");
  const bin = imgwBin();
  if (!existsSync(bin)) throw new Error(`no imgw binary at ${bin} (cargo build --bin imgw, or set IMGW_BIN)`);
  const argv = [
    "serve",
    "--insecure-dev-auth",
    "--ws-listen", "127.0.0.1:0",
    "--tcp-listen", "127.0.0.1:0",
    "--admin-listen", "127.0.0.1:0",
    "--ports-file", portsFile,
    "--data-dir", data,
    "--shards", "1",
    "--log", "warn",
    ...args,
  ];
  const proc = spawn(bin, argv, { stdio: ["ignore", "ignore", "pipe"] });
  running.add(proc);
  let stderr = "";
  proc.stderr.on("data", (d) => {
    // The last 16 KiB, for the error message of a failed start.
    stderr = (stderr + d.toString()).slice(-16384);
  });
  let exited = null;
  const exit = new Promise((r) =>
    proc.on("exit", (code, signal) => {
      exited = { code, signal };
      running.delete(proc);
      r(exited);
    }),
  );
  const failIfExited = () => {
    if (exited) throw new Error(`imgw exited (${JSON.stringify(exited)}) during start:\n${stderr}`);
  };
  const ports = await waitFor(() => {
    failIfExited();
    try {
      return JSON.parse(readFileSync(portsFile, "utf8"));
    } catch {
      return null;
    }
  }, 30_000, "the ports file");
  const admin = `http://${ports.admin}`;
  await waitFor(async () => {
    failIfExited();
    try {
      const r = await fetch(`${admin}/readyz`, { signal: AbortSignal.timeout(2000) });
      return r.status === 200;
    } catch {
      return false;
    }
  }, 30_000, "GET /readyz = 200");
  return {
    ports,
    ws: `ws://${ports.ws}/ws`,
    admin,
    dataDir: data,
    proc,
    stderr: () => stderr,
    /** Sends `signal` and waits (at most 10 s, then SIGKILL) for the exit. */
    async stop(signal = "SIGTERM") {
      if (exited) return exited;
      proc.kill(signal);
      const t = setTimeout(() => proc.kill("SIGKILL"), 10_000);
      const r = await exit;
      clearTimeout(t);
      return r;
    },
    cleanup() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** POSTs JSON to the admin port; returns the status. */
export async function adminPost(gw, path, body) {
  const r = await fetch(`${gw.admin}${path}`, {
    method: "POST",
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  await r.text();
  return r.status;
}
