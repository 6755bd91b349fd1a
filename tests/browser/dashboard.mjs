// Drives the node's web dashboard in headless Chromium against a running
// devnet (started by node/tests/browser.rs), and checks what a person
// watching it would see. Environment:
//   DASHBOARD_LOGIN   the login URL `openagi dashboard` printed for node 0
//   EXPECT_PEER_ID    node 0's peer id
//   SCREENSHOT_DIR    where to save a screenshot of each page
//   CHROMIUM          the browser (default /usr/bin/chromium)
// Prints one JSON line of figures; exits non-zero on the first failure.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const login = process.env.DASHBOARD_LOGIN;
const peerId = process.env.EXPECT_PEER_ID;
const shots = process.env.SCREENSHOT_DIR || "screenshots";
if (!login || !peerId) throw new Error("DASHBOARD_LOGIN and EXPECT_PEER_ID are required");
const base = new URL(login).origin;
mkdirSync(shots, { recursive: true });

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const figures = {};
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.on("response", (r) => { if (r.status() >= 400) consoleErrors.push(`${r.status()} ${r.url()}`); });

  // Without a login the page is refused.
  const refused = await page.goto(`${base}/`);
  check(refused.status() === 401, `the page without a login answered ${refused.status()}`);
  consoleErrors.length = 0; // the refusal itself is logged as an error

  // Log in with the printed URL; count what the first load transfers.
  let bytes = 0;
  const onResponse = async (r) => {
    if (r.url().includes("/dashboard/api/events")) return;
    try { bytes += (await r.body()).length; } catch { /* redirects have no body */ }
  };
  page.on("response", onResponse);
  const started = Date.now();
  const loggedIn = await page.goto(login);
  check(loggedIn.status() === 200, `login answered ${loggedIn.status()}`);
  check(new URL(page.url()).pathname === "/", `login landed on ${page.url()}`);
  await page.waitForFunction(
    () => [...document.querySelectorAll("svg.chart[data-series]")].some((s) => Number(s.dataset.points) > 0),
    null, { timeout: 30000 },
  );
  figures.time_to_first_chart_ms = Date.now() - started;
  await page.waitForLoadState("networkidle").catch(() => {});
  page.off("response", onResponse);
  figures.first_load_bytes = bytes;

  // The session cookie is not readable by scripts.
  const cookies = await page.evaluate(() => document.cookie);
  check(!cookies.includes("openagi_session"), "the session cookie is readable by scripts");

  // The overview shows this node, and a ledger height that rises.
  const shownPeer = await page.textContent("#peer-id");
  check(shownPeer.trim() === peerId, `overview shows peer ${shownPeer}, expected ${peerId}`);
  const height = async () => Number(await page.textContent("#height"));
  const first = await height();
  await page.waitForFunction((h) => Number(document.querySelector("#height").textContent) > h, first, { timeout: 30000 });
  figures.height_seen = [first, await height()];
  check((await page.textContent("#live")).trim() === "live", "live updates are not connected");
  // A chart has drawn a line with points.
  await page.waitForFunction(
    () => Number(document.querySelector('svg[data-series="ledger_height"]').dataset.points) >= 2,
    null, { timeout: 30000 },
  );
  check(await page.locator('svg[data-series="ledger_height"] path.line').count() === 1, "the height chart has no line");
  await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });

  for (const name of ["network", "consensus", "alerts"]) {
    await page.click(`nav a[data-page="${name}"]`);
    await page.waitForSelector(`#page-${name}:not([hidden])`);
    await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  }
  // The network page lists the connected peers with their traffic, and
  // their connections.
  check(await page.locator("#peer-table tbody tr").count() >= 1, "no peers on the network page");
  check(/direct \d/.test(await page.textContent("#peer-table tbody")), "no per-peer traffic");
  check(await page.locator("#connection-events tbody tr").count() >= 1, "no connection events");
  // The consensus page shows what each validator last sent.
  check(/prepare|commit/.test(await page.textContent("#validator-table tbody")), "no validator votes");
  // The ledger explorer shows a block with its certificate.
  await page.click('nav a[data-page="consensus"]');
  await page.fill("#block-height", "1");
  await page.click("#block-form button");
  await page.waitForFunction(() => document.querySelector("#explorer").textContent.includes("certificate"), null, { timeout: 10000 });
  await page.screenshot({ path: `${shots}/consensus.png`, fullPage: true });
  // The alert rules are listed.
  check(await page.locator("#alert-table tbody tr").count() >= 5, "the alert rules are missing");

  // A training job's accuracy appears on the learning page.
  await page.click('nav a[data-page="learning"]');
  await page.waitForFunction(
    () => /accuracy \d/.test(document.querySelector("#jobs").textContent)
      && Number(document.querySelector("svg.job-accuracy")?.dataset.points || 0) > 0,
    null, { timeout: 180000 },
  );
  figures.accuracy_text = (await page.textContent("#jobs .job p:nth-of-type(2)")).trim();
  // The job says how it protects updates (the devnet job: no privacy).
  check(/coordinator sees each update/.test(await page.textContent("#jobs .privacy-mode")), "no privacy mode shown");
  await page.screenshot({ path: `${shots}/learning.png`, fullPage: true });
  // A model of the lineage downloads with the session.
  const href = await page.getAttribute("#jobs .lineage a:last-child", "href");
  const model = await page.request.get(`${base}${href}`);
  check(model.status() === 200, `model download answered ${model.status()}`);
  check((await model.body()).length >= 4 * 650, "the model file is too small");

  // The benchmark runs recorded with this node's data directory.
  await page.click('nav a[data-page="benchmarks"]');
  await page.waitForFunction(() => document.querySelectorAll("#bench-table tbody tr").length >= 2, null, { timeout: 10000 });
  check(await page.locator("#bench-charts svg.chart").count() >= 1, "no benchmark chart");
  await page.screenshot({ path: `${shots}/benchmarks.png`, fullPage: true });

  check(consoleErrors.length === 0, `console errors: ${consoleErrors.join("; ")}`);
  console.log(JSON.stringify(figures));
} finally {
  await browser.close();
}
