// The --web pages in a real browser: Debian's chromium (headless, $CHROMIUM or
// /usr/bin/chromium) driven by playwright-core against a real `imgw serve --web`. Screenshots
// of each page go to $BROWSER_TEST_OUT (default $CARGO_TARGET_DIR/browser-tests, else
// target/browser-tests). Every wait is bounded (playwright's timeouts, the tests' own).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, existsSync } from "node:fs";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startGateway, waitFor, adminPost } from "./gateway.mjs";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const out =
  process.env.BROWSER_TEST_OUT ?? join(process.env.CARGO_TARGET_DIR ?? join(repo, "target"), "browser-tests");
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const WAIT = 15_000;

let gw;
let browser;
before(async () => {
  if (!existsSync(executablePath)) throw new Error(`no chromium at ${executablePath} (tests/setup.sh installs it)`);
  mkdirSync(out, { recursive: true });
  gw = await startGateway({ args: ["--web", "--durability", "local"] });
  browser = await chromium.launch({
    executablePath,
    headless: true,
    timeout: 60_000,
    // Root in CI containers: chromium's sandbox needs user namespaces it may not have.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
});
after(async () => {
  await browser?.close();
  if (gw) {
    await gw.stop();
    gw.cleanup();
  }
});

/** A chat page logged in as `user` on `device` (in its own browser context: its own
 * sessionStorage, as another tab or browser would have), connected. `query`: more of the
 * page's URL parameters. */
async function chatPage(user, device, query = "") {
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${gw.admin}/chat?user=${encodeURIComponent(user)}&device=${encodeURIComponent(device)}${query}`);
  await page.locator('[data-testid=status][data-state=connected]').waitFor();
  page.jsErrors = errors;
  return page;
}

/** The gateway's count of `hello`s that came in a request target (its `hello` frames in
 * from a WebSocket upgrade whose target had one are counted apart). */
async function urlHellos() {
  const metrics = await (await fetch(`${gw.admin}/metrics`)).text();
  return [...metrics.matchAll(/imgw_url_hellos_total\{shard="\d+"\} (\d+)/g)].reduce((n, m) => n + Number(m[1]), 0);
}

const bodies = (page) => page.locator("[data-testid=msg] .body").allTextContents();

async function sendText(page, text) {
  await page.getByTestId("text").fill(text);
  await page.getByTestId("text").press("Enter");
}

async function openContact(page, id) {
  await page.locator(`[data-testid=contact][data-id="${id}"]`).click();
  await page.locator("[data-testid=conv-title]", { hasText: id }).waitFor();
}

async function addContact(page, id) {
  await page.getByTestId("contact-input").fill(id);
  await page.getByTestId("contact-input").press("Enter");
  await page.locator("[data-testid=conv-title]", { hasText: id }).waitFor();
}

/** Deliveries the gateway has pushed and waits to have acked, summed over its shards. */
async function pendingDeliveries() {
  const text = await (await fetch(`${gw.admin}/metrics`, { signal: AbortSignal.timeout(2000) })).text();
  const rows = [...text.matchAll(/^imgw_deliveries\{shard="\d+",state="pending"\} (-?\d+)$/gm)];
  if (rows.length === 0) throw new Error("no imgw_deliveries pending rows in /metrics");
  return rows.reduce((sum, m) => sum + Number(m[1]), 0);
}

/** Waits until the open conversation shows exactly `want` (bounded), then checks it. */
async function expectBodies(page, want, what) {
  try {
    await waitFor(async () => JSON.stringify(await bodies(page)) === JSON.stringify(want), WAIT, what);
  } finally {
    assert.deepEqual(await bodies(page), want, what);
  }
}

test("two pages chat, presence, a second device, a group", { timeout: 120_000 }, async () => {
  const alice = await chatPage("alice", "a1");
  const bob = await chatPage("bob", "b1");
  await addContact(alice, "bob");
  // Presence: bob is online, as alice's contact list shows.
  await alice.locator('[data-testid=contact][data-id="bob"][data-status=online]').waitFor();
  await sendText(alice, "hi bob");
  await sendText(alice, "how are you?");
  // bob's page learns of alice from the message and counts it unread.
  await bob.locator('[data-testid=contact][data-id="alice"] .unread', { hasText: "2" }).waitFor();
  await openContact(bob, "alice");
  await expectBodies(bob, ["hi bob", "how are you?"], "bob sees alice's messages");
  await sendText(bob, "fine, thanks");
  await expectBodies(alice, ["hi bob", "how are you?", "fine, thanks"], "alice sees the reply after hers");
  // alice's own messages were acked (no longer pending).
  await waitFor(async () => (await alice.locator("[data-testid=msg].pending").count()) === 0, WAIT, "acks");

  // bob on a second device: a new device starts at the beginning of bob's inbox, so it
  // shows the whole conversation (bob's own reply too); what alice sends reaches both; what
  // bob sends there shows on the first device too, as his. This page says `hello` in the
  // WebSocket's URL (the SDK's helloInUrl), which Chromium's WebSocket then carries.
  const hellosBefore = await urlHellos();
  const bob2 = await chatPage("bob", "b2", "&hello_in_url=1");
  assert.equal(await urlHellos(), hellosBefore + 1, "bob2's hello came in the URL");
  await sendText(alice, "to both devices");
  await bob2.locator('[data-testid=contact][data-id="alice"]').waitFor();
  await openContact(bob2, "alice");
  await expectBodies(bob2, ["hi bob", "how are you?", "fine, thanks", "to both devices"], "bob's second device");
  await sendText(bob2, "from my other device");
  await expectBodies(
    bob,
    ["hi bob", "how are you?", "fine, thanks", "to both devices", "from my other device"],
    "bob's first device shows his message from the second",
  );
  assert.equal(await bob.locator("[data-testid=msg].mine").last().locator(".body").textContent(), "from my other device");

  // A group: both join, alice writes, bob reads.
  for (const p of [alice, bob]) {
    await p.getByTestId("group-input").fill("crew");
    await p.getByTestId("group-input").press("Enter");
    await p.locator("[data-testid=conv-title]", { hasText: "#crew" }).waitFor();
  }
  await sendText(alice, "hello crew");
  await expectBodies(bob, ["hello crew"], "bob sees the group message");
  await alice.screenshot({ path: join(out, "chat-alice.png"), fullPage: true });
  await bob.screenshot({ path: join(out, "chat-bob.png"), fullPage: true });
  for (const p of [alice, bob, bob2]) assert.deepEqual(p.jsErrors, [], "no script errors");
  for (const p of [alice, bob, bob2]) await p.context().close();
});

test("a page that went offline shows what it missed once and in order", { timeout: 120_000 }, async () => {
  const ann = await chatPage("ann", "laptop");
  const ben = await chatPage("ben", "phone");
  await addContact(ann, "ben");
  await sendText(ann, "before");
  await ben.locator('[data-testid=contact][data-id="ann"]').waitFor();
  await openContact(ben, "ann");
  await expectBodies(ben, ["before"], "the first message");

  // The button: the page's client disconnects, and later resumes.
  await ben.getByTestId("toggle").click();
  await ben.locator('[data-testid=status][data-state=closed]').waitFor();
  await ann.locator('[data-testid=contact][data-id="ben"][data-status=offline]').waitFor();
  for (const t of ["o1", "o2", "o3"]) await sendText(ann, t);
  await waitFor(async () => (await ann.locator("[data-testid=msg].pending").count()) === 0, WAIT, "ann's acks");
  await ben.getByTestId("toggle").click();
  await expectBodies(ben, ["before", "o1", "o2", "o3"], "back online: the missed messages once, in order");
  // The page acks what it showed after a short delay (ackDelayMs). A page closed before that
  // leaves o1..o3 unacked, and the gateway rightly pushes them again to the next page: wait
  // until the gateway holds no delivery waiting for its ack.
  await waitFor(async () => (await pendingDeliveries()) === 0, WAIT, "ben's acks of o1..o3");

  // Closed: the page is gone; messages are sent; the device comes back in a new page.
  await ben.context().close();
  const missed = Array.from({ length: 12 }, (_, i) => `missed ${i + 1}`);
  for (const t of missed) await sendText(ann, t);
  await waitFor(async () => (await ann.locator("[data-testid=msg].pending").count()) === 0, WAIT, "ann's acks");
  const back = await chatPage("ben", "phone");
  await back
    .locator('[data-testid=contact][data-id="ann"] .unread', { hasText: String(missed.length) })
    .waitFor()
    .catch(async (e) => {
      // Say what the page showed instead (a count short of or past 12), for the CI log.
      const shown = await back.getByTestId("contact").allTextContents();
      throw new Error(`${e.message}\ncontacts shown: ${JSON.stringify(shown)}`);
    });
  await openContact(back, "ann");
  await expectBodies(back, missed, "the new page shows the missed messages once, in order");
  await sendText(ann, "live again");
  await expectBodies(back, [...missed, "live again"], "and then live ones");
  await back.screenshot({ path: join(out, "chat-back-online.png"), fullPage: true });
  assert.deepEqual(back.jsErrors, []);
  await ann.context().close();
  await back.context().close();
});

test("the dashboard shows deliveries after traffic", { timeout: 120_000 }, async () => {
  // Traffic of its own, so this test stands alone: an admin push to an online page.
  const cy = await chatPage("cy", "tab");
  const context = await browser.newContext({ viewport: { width: 1300, height: 900 } });
  const dash = await context.newPage();
  dash.setDefaultTimeout(WAIT);
  const errors = [];
  dash.on("pageerror", (e) => errors.push(e.message));
  await dash.goto(`${gw.admin}/dashboard`);
  for (let i = 0; i < 5; i++) {
    assert.equal(await adminPost(gw, "/push", { tenant: "dev", user: "cy", body: `push ${i}`, from: "ops" }), 202);
  }
  await cy.locator('[data-testid=contact][data-id="ops"] .unread', { hasText: "5" }).waitFor();
  await waitFor(async () => Number(await dash.getByTestId("deliveries-total").textContent()) >= 5, WAIT, "deliveries on the dashboard");
  // Two scrapes at least: rates and latencies have a previous sample.
  await dash.locator("[data-testid=chart-deliveries] .legend span").first().waitFor();
  await dash.locator("[data-testid=chart-connections] .legend span").first().waitFor();
  // A few more scrapes, so that the screenshot shows lines rather than points.
  await dash.waitForTimeout(3000);
  const conns = await dash.getByTestId("connections").textContent();
  assert.match(conns ?? "", /^[1-9]\d* \(/, "at least the chat page's connection");
  await dash.screenshot({ path: join(out, "dashboard.png"), fullPage: true });
  assert.deepEqual(errors, []);
  await context.close();
  await cy.context().close();
});
