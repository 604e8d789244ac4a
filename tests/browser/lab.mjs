// Drives notebook 06 in a real JupyterLab with headless Chromium (tests/test_browser.py starts the
// server and installs playwright-core; see issue #8):
//   open the notebook, wait for the kernel to be idle in the status bar, run all (`runmenu:run-all`),
//   click the ablation panel's Run button, wait for "win rate over π_sft" in its status line, save a
//   screenshot. Exits 0 on success; on failure prints why (and saves <screenshot>-failure.png), exits 1.
//
// Settings come from the environment:
//   LAB_URL            http://127.0.0.1:<port>/lab/tree/<notebook>?token=<token>   (required)
//   SCREENSHOT         where the PNG goes                                            (required)
//   PLAYWRIGHT_MODULES folder holding node_modules/playwright-core                   (required)
//   CHROMIUM           the browser binary (default /usr/bin/chromium)
//   POINT_TIMEOUT_S    how long the Run point may take (default 420)
import { createRequire } from "node:module";
import path from "node:path";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === "") throw new Error(`environment variable ${name} is not set`);
  return value;
};
const LAB_URL = env("LAB_URL");
const SCREENSHOT = env("SCREENSHOT");
const CHROMIUM = env("CHROMIUM", "/usr/bin/chromium");
const POINT_TIMEOUT_MS = Number(env("POINT_TIMEOUT_S", "420")) * 1000;
const { chromium } = createRequire(path.join(env("PLAYWRIGHT_MODULES"), "noop.js"))("playwright-core");

const t0 = Date.now();
const log = (msg) => console.log(`[lab.mjs ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const SUCCESS = "win rate over π_sft";

// The kernel item of the status bar reads "<kernel name> | <status>", e.g. "Python 3 (vcb) | Idle".
const KERNEL_STATUS = '.jp-StatusBar-TextItem[title^="Change kernel for"]';
// Output widgets of the notebook (the panel lives in one cell's output area).
const OUTPUT = ".jp-Notebook .jp-OutputArea-output";

async function kernelStatus(page) {
  const item = page.locator(KERNEL_STATUS).first();
  return (await item.count()) ? (await item.innerText()).trim() : "(no kernel item in the status bar)";
}

async function waitForIdle(page, what, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  let idleSince = null;
  for (;;) {
    const status = await kernelStatus(page);
    if (status !== last) log(`kernel status: ${status}`);
    last = status;
    // Idle twice in a row, 1 s apart: a kernel that just started reports idle between its first replies.
    if (/\|\s*Idle$/i.test(status)) {
      idleSince ??= Date.now();
      if (Date.now() - idleSince >= 1000) return;
    } else {
      idleSince = null;
      // "Unknown" and "Connecting" are passing states while the kernel starts; "Dead" is final.
      if (/\|\s*Dead$/i.test(status)) throw new Error(`${what}: the kernel is ${status}`);
    }
    if (Date.now() > deadline) throw new Error(`${what}: the kernel was not idle within ${timeoutMs / 1000} s (status bar: "${status}")`);
    await sleep(250);
  }
}

// Execution prompts of the code cells: "[ ]:" not run, "[*]:" queued or running, "[3]:" done.
const prompts = (page) =>
  page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").evaluateAll((els) => els.map((e) => e.textContent.trim()));

// Error outputs (the model when the app is exposed, else the rendered tracebacks).
async function cellErrors(page) {
  return page.evaluate(() => {
    const strip = (s) => s.replace(/\u001b\[[0-9;]*m/g, "");
    const panel = window.jupyterapp?.shell?.currentWidget;
    const nb = panel?.context?.model?.toJSON?.();
    if (nb) {
      return nb.cells.flatMap((cell, i) =>
        (cell.outputs || [])
          .filter((o) => o.output_type === "error")
          .map((o) => `cell ${i}: ${o.ename}: ${o.evalue}\n${strip((o.traceback || []).join("\n"))}`));
    }
    return [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map((e) => e.innerText)
      .filter((t) => t.includes("Traceback"));
  });
}

async function runAll(page) {
  const exposed = await page.evaluate(() => Boolean(window.jupyterapp?.commands));
  if (exposed) {
    // Run-all acts on the current notebook: wait until the command is enabled for it.
    await page.waitForFunction(() => window.jupyterapp.commands.isEnabled("runmenu:run-all"), null, { timeout: 30_000 });
    log("executing runmenu:run-all (window.jupyterapp.commands)");
    // Do not await the command's promise here: completion is checked on the prompts below.
    await page.evaluate(() => { window.jupyterapp.commands.execute("runmenu:run-all"); });
  } else {
    log("window.jupyterapp is not exposed: Run menu > Run All Cells");
    await page.locator(".lm-MenuBar-itemLabel", { hasText: /^Run$/ }).click();
    await page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click();
  }
}

async function waitForRunAll(page, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  for (;;) {
    const p = await prompts(page);
    const shown = p.join(" ");
    if (shown !== last) log(`cell prompts: ${shown}`);
    last = shown;
    if (p.length && p.every((s) => /\[\d+\]/.test(s))) break;
    const errors = await cellErrors(page);
    if (errors.length) throw new Error(`run all: a cell failed:\n${errors.join("\n\n")}`);
    if (Date.now() > deadline) throw new Error(`run all did not finish within ${timeoutMs / 1000} s (prompts: ${shown})`);
    await sleep(500);
  }
  await waitForIdle(page, "after run all", 60_000);
  const errors = await cellErrors(page);
  if (errors.length) throw new Error(`run all: a cell failed:\n${errors.join("\n\n")}`);
}

// Texts of the panel's HTML widgets and progress bar (the status line is one of them).
const panelTexts = (page) =>
  page.evaluate((sel) => {
    const html = [...document.querySelectorAll(`${sel} .widget-html-content`)].map((e) => e.innerText.trim()).filter(Boolean);
    const progress = [...document.querySelectorAll(`${sel} :is(.widget-hprogress, .widget-vprogress) .widget-label`)].map((e) => e.innerText.trim());
    return { html, progress };
  }, OUTPUT);

async function main() {
  log(`launching ${CHROMIUM}`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
    timeout: 60_000,
  });
  const consoleErrors = [];
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1440, height: 1000 } });
    page = await context.newPage();
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    page.on("pageerror", (e) => consoleErrors.push(`pageerror: ${e.message}`));

    log(`opening ${LAB_URL.replace(/token=[^&]+/, "token=***")}`);
    await page.goto(LAB_URL, { waitUntil: "domcontentloaded", timeout: 60_000 });
    await page.locator(".jp-Notebook .jp-Cell").first().waitFor({ state: "visible", timeout: 90_000 });
    log("notebook rendered");
    await waitForIdle(page, "opening the notebook", 120_000);

    await runAll(page);
    await waitForRunAll(page, 240_000);
    log("run all finished");

    const runButton = page.locator(`${OUTPUT} button.widget-button`, { hasText: /^\s*Run\s*$/ });
    await runButton.first().waitFor({ state: "visible", timeout: 30_000 });
    if ((await runButton.count()) !== 1) throw new Error(`expected one Run button in the outputs, found ${await runButton.count()}`);
    await runButton.scrollIntoViewIfNeeded();
    await runButton.click();
    log("clicked Run");

    const deadline = Date.now() + POINT_TIMEOUT_MS;
    let last = "";
    let result;
    for (;;) {
      const { html, progress } = await panelTexts(page);
      const shown = `[${progress.join(" ")}] ${html.join(" | ").slice(0, 200)}`;
      if (shown !== last) log(`panel: ${shown}`);
      last = shown;
      const ok = html.find((t) => t.includes(SUCCESS));
      const failed = html.find((t) => /\bfailed:/.test(t));
      if (failed) throw new Error(`the panel's point failed:\n${failed}`);
      if (ok) { result = ok; break; }
      if (Date.now() > deadline) throw new Error(`no "${SUCCESS}" within ${POINT_TIMEOUT_MS / 1000} s (panel: ${shown})`);
      await sleep(1000);
    }
    log(`result: ${result}`);

    // The live plot: the Image widget gets the PNG after the status line; wait until it is drawn.
    await page.waitForFunction(
      (sel) => [...document.querySelectorAll(`${sel} img.widget-image`)].some((i) => i.complete && i.naturalWidth > 0),
      OUTPUT, { timeout: 60_000 });
    await runButton.evaluate((b) => b.closest(".jp-OutputArea").scrollIntoView({ block: "start" }));
    await sleep(500);
    await page.screenshot({ path: SCREENSHOT });
    log(`screenshot: ${SCREENSHOT}`);
    console.log(`RESULT ${JSON.stringify({ status: result })}`);
  } catch (err) {
    if (page) {
      const failure = SCREENSHOT.replace(/\.png$/, "") + "-failure.png";
      await page.screenshot({ path: failure, fullPage: true }).then(() => log(`failure screenshot: ${failure}`), () => {});
    }
    if (consoleErrors.length) console.error(`browser console errors (last 20):\n${consoleErrors.slice(-20).join("\n")}`);
    throw err;
  } finally {
    await browser.close().catch(() => {});
  }
}

main().then(
  () => process.exit(0),
  (err) => { console.error(`FAILED: ${err?.stack || err}`); process.exit(1); },
);
