// Screenshot of Flower's task list with headless Chromium (Debian's package) through playwright-core.
// usage: node flower.mjs <flower base url> <user:password> <out.png>
// Prints the task table's text on stdout, so a test can check what the picture shows.
import { chromium } from "playwright-core";

const [base, credentials, out] = process.argv.slice(2);
if (!base || !credentials || !out) {
  console.error("usage: node flower.mjs <flower base url> <user:password> <out.png>");
  process.exit(2);
}
const [username, ...rest] = credentials.split(":");
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
try {
  const context = await browser.newContext({
    httpCredentials: { username, password: rest.join(":") },
    viewport: { width: 1440, height: 600 },
    deviceScaleFactor: 1,
  });
  const page = await context.newPage();
  await page.goto(`${base}/tasks`, { waitUntil: "networkidle", timeout: 30000 });
  await page.waitForSelector("#tasks-table tbody tr td", { timeout: 30000 });
  await page.waitForFunction(
    () => document.querySelector("#tasks-table tbody")?.innerText.includes("events."),
    null,
    { timeout: 30000 },
  );
  await page.screenshot({ path: out, fullPage: false });
  console.log(await page.locator("#tasks-table").innerText());
} finally {
  await browser.close();
}
