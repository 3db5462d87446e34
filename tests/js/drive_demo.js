// Drive a running `scalegen demo` in headless Chromium as a visitor would: type a prompt, press
// Generate, wait for the answer, measure what the 3D viewer drew, press Download. Prints one JSON
// object: {info, object_pixels, page_errors, console_errors}; the downloaded file lands in DOWNLOAD_DIR.
// Usage: node tests/js/drive_demo.js URL PROMPT DOWNLOAD_DIR SCREENSHOT.png
// Needs `npm ci` (puppeteer-core) and a Chromium; $CHROMIUM overrides the browser path.
"use strict";
const fs = require("fs");
const path = require("path");
const puppeteer = require("puppeteer-core");

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const [url, prompt, dir, shot] = process.argv.slice(2);
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"],
  });
  const out = { page_errors: [], console_errors: [] };
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 900 });
    page.on("pageerror", (e) => out.page_errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") out.console_errors.push(m.text()); });
    const cdp = await page.createCDPSession();
    await cdp.send("Browser.setDownloadBehavior", { behavior: "allow", downloadPath: path.resolve(dir) });
    await page.goto(url, { waitUntil: "networkidle0", timeout: 60000 });
    await page.type("#prompt textarea", prompt);
    await page.click("#generate");
    await page.waitForFunction(() => {
      const t = document.querySelector("#info textarea");
      return t && t.value.length > 0;
    }, { timeout: 120000 });
    out.info = await page.$eval("#info textarea", (t) => t.value);
    await page.waitForSelector("#model canvas", { timeout: 60000 });
    await sleep(4000);  // the viewer loads the GLB and draws a few frames
    const viewer = await page.$("#model canvas");
    const png = await viewer.screenshot({ encoding: "base64" });
    await page.screenshot({ path: shot });
    // Fraction of the viewer's pixels that differ from its corner (the background).
    out.object_pixels = await page.evaluate(async (b64) => {
      const img = new Image();
      img.src = "data:image/png;base64," + b64;
      await img.decode();
      const c = document.createElement("canvas");
      c.width = img.width; c.height = img.height;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) {
        if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 30) n++;
      }
      return n / (d.length / 4);
    }, png);
    await page.click("#download");
    for (let i = 0; i < 100; i++) {
      if (fs.readdirSync(dir).some((f) => f.endsWith(".glb"))) break;
      await sleep(200);
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
