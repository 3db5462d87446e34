// Open a `scalegen gallery` page in headless Chromium and report what a visitor would get:
// console errors and warnings, uncaught exceptions, failed requests, how many models the viewers
// loaded, whether the turntable videos decode, what the search box does, the mean colour each
// viewer drew, and a screenshot.
// Usage: node tests/js/check_page.js PAGE.html SCREENSHOT.png [SEARCH_WORD]
// Needs `npm ci` (puppeteer-core) and a Chromium; $CHROMIUM overrides the browser path.
"use strict";
const path = require("path");
const puppeteer = require("puppeteer-core");

async function main() {
  const [page_path, shot, word] = process.argv.slice(2);
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--autoplay-policy=no-user-gesture-required"],
  });
  const out = { console: [], page_errors: [], failed_requests: [] };
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 900 });
    page.on("console", (m) => out.console.push({ type: m.type(), text: m.text() }));
    page.on("pageerror", (e) => out.page_errors.push(String(e)));
    page.on("requestfailed", (r) => out.failed_requests.push(`${r.url()} ${r.failure() && r.failure().errorText}`));
    page.on("response", (r) => { if (r.status() >= 400) out.failed_requests.push(`${r.url()} HTTP ${r.status()}`); });
    await page.goto("file://" + path.resolve(page_path), { waitUntil: "load" });
    const cards = await page.$$eval(".card", (c) => c.length);
    await page.waitForFunction(
      (n) => Number(document.body.dataset.loaded || 0) + Number(document.body.dataset.failed || 0) >= n,
      { timeout: 60000 }, cards);
    // Videos: wait until every one has a decoded frame (or an error).
    await page.waitForFunction(
      () => Array.from(document.querySelectorAll("video")).every((v) => v.readyState >= 2 || v.error),
      { timeout: 30000 });
    await new Promise((r) => setTimeout(r, 1500));  // a few animation frames for the viewers
    Object.assign(out, await page.evaluate(async () => {
      const viewers = Array.from(document.querySelectorAll("model-viewer"));
      const colours = [];
      for (const mv of viewers) {
        // The viewer's own snapshot of its canvas; mean colour of the pixels that differ from the corner.
        const img = new Image();
        img.src = mv.toDataURL("image/png");
        await img.decode();
        const c = document.createElement("canvas");
        c.width = img.width; c.height = img.height;
        const g = c.getContext("2d");
        g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        const bg = [d[0], d[1], d[2], d[3]];
        let n = 0; const s = [0, 0, 0];
        for (let i = 0; i < d.length; i += 4) {
          if (Math.abs(d[i] - bg[0]) + Math.abs(d[i + 1] - bg[1]) + Math.abs(d[i + 2] - bg[2]) + Math.abs(d[i + 3] - bg[3]) > 30) {
            n++; s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2];
          }
        }
        colours.push({ object_pixels: n / (d.length / 4), mean_rgb: n ? s.map((x) => x / n / 255) : null });
      }
      return {
        cards: document.querySelectorAll(".card").length,
        loaded: Number(document.body.dataset.loaded || 0),
        failed: Number(document.body.dataset.failed || 0),
        status: document.getElementById("status").textContent,
        videos: Array.from(document.querySelectorAll("video")).map((v) => ({
          ready: v.readyState, error: v.error && v.error.code, width: v.videoWidth,
          played: v.played.length > 0 && v.played.end(0) > 0 })),
        viewer_colours: colours,
        prompts: Array.from(document.querySelectorAll(".card")).map((c) => c.dataset.prompt),
      };
    }));
    await page.screenshot({ path: shot, fullPage: true });
    if (word) {
      await page.type("#search", word);
      out.search = await page.evaluate(() => ({
        visible: Array.from(document.querySelectorAll(".card")).filter((c) => !c.hidden).map((c) => c.dataset.prompt),
        shown: document.getElementById("shown").textContent,
      }));
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(String(e && e.stack || e));
  process.exit(1);
});
