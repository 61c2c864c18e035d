//! The live page in a real browser: `coupon-lab demo --dashboard` runs a
//! small drop on the embedded mock cluster while headless Chromium (Debian's
//! `chromium`, installed by scripts/dev-up through scripts/install-chromium)
//! has the page open; the test watches the page go live, waits for the
//! sold-out moment and the end, and checks the figures in the DOM against
//! the final JSON report: stock 0, issued = stock, every audit counter 0
//! and green, the same accepted, decided, sold-out moment and skew.
//!
//! Chromium is driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: NUL-separated JSON on file descriptors 3 and
//! 4, wired to the child's stdin and stdout by `sh`), so no WebSocket
//! client or browser crate is needed.
//!
//! `COUPONRUSH_CHROMIUM=PATH` picks another browser binary. The test skips,
//! saying so loudly, only when no chromium can be found or installed.
//!
//! With `COUPONRUSH_SCREENSHOTS=DIR` it also writes the page mid-drop
//! (`dashboard-live.png`) and the HTML report
//! (`dashboard-report.png`): the README's pictures.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use couponrush_lab::Cli;
use couponrush_loadgen::report::Report;
use couponrush_loadgen::Verdict;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The browser, installing it if missing; `None` only if it cannot be had.
fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("COUPONRUSH_CHROMIUM") {
        return Some(p.into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-chromium");
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| path.into())
}

/// A headless Chromium spoken to over the DevTools protocol on a pipe.
struct Browser {
    child: Child,
    to: ChildStdin,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: String,
    _profile: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    fn open(binary: &Path, url: &str) -> Browser {
        let profile = TempDir(std::env::temp_dir().join(format!(
            "couponrush-chromium-{}",
            uuid::Uuid::new_v4().simple()
        )));
        let log = std::env::temp_dir().join("couponrush-chromium.log");
        // fd 3 is what chromium reads commands from, fd 4 where it writes
        // answers: our pipes, moved there by the shell.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null 2>>"$LOG""#)
            .arg(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-pipe",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .env("LOG", &log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let to = child.stdin.take().expect("piped");
        let mut reader = BufReader::new(child.stdout.take().expect("piped"));
        let (tx, from) = mpsc::sync_channel(1024);
        std::thread::spawn(move || loop {
            let mut buf = Vec::new();
            match reader.read_until(0, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    buf.pop();
                    if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                        if v.get("id").is_some() && tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to,
            from,
            next: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 1500, "deviceScaleFactor": 1, "mobile": false }),
        );
        b.call("Page.navigate", json!({ "url": url }));
        b
    }

    /// Sends one command (to the page once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({ "id": self.next, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("chromium reads its pipe");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium did not answer {method} in 30 s"));
            if answer["id"] == json!(self.next) {
                if let Some(e) = answer.get("error") {
                    panic!("chromium refused {method}: {e}");
                }
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates `js` in the page; its JSON-able value.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": js, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }

    fn screenshot(&mut self, path: &Path) {
        let r = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("png data"))
            .expect("base64");
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the page shows, read from the DOM (`data-value` holds the raw
/// number behind each formatted figure).
const READ_PAGE: &str = r#"(() => {
  const v = (id) => { const e = document.getElementById(id); return e ? e.dataset.value : null; };
  const audit = {};
  for (const k of ["oversold","double_issued","lost","phantom","inconsistent_replays","ledger_mismatch","dlq"]) {
    const e = document.getElementById("audit-" + k);
    audit[k] = { value: e.dataset.value, class: e.className };
  }
  return { phase: v("phase"), verdict: v("verdict"), stock: v("stock"), stock_left: v("stock-left"),
           issued: v("issued"), elapsed: v("elapsed"), accepted: v("accepted"), decided: v("decided"), sold_out: v("sold-out"),
           late_winners: v("skew-late"), audit };
})()"#;

fn num(page: &Value, key: &str) -> f64 {
    page[key]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("the page shows no number for {key}: {page}"))
}

/// Watches the page until the drop is over; returns the last reading and
/// whether the page was seen live mid-drop.
fn watch(binary: &Path, url: &str, shots: Option<&Path>) -> (Value, bool) {
    let mut browser = Browser::open(binary, url);
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut seen_running, mut shot_live) = (false, false);
    loop {
        assert!(
            Instant::now() < deadline,
            "the page never showed the end of the drop"
        );
        let page = browser.eval(READ_PAGE);
        let phase = page["phase"].as_str().unwrap_or_default().to_string();
        if phase == "running" {
            seen_running = true;
            // The picture of the page mid-drop: a few seconds in, with
            // stock still left.
            let left = page["stock_left"]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok());
            let elapsed = page["elapsed"].as_str().and_then(|s| s.parse::<f64>().ok());
            if let (Some(dir), Some(l), Some(t), false) = (shots, left, elapsed, shot_live) {
                if l > 0 && t >= 2.5 {
                    browser.screenshot(&dir.join("dashboard-live.png"));
                    shot_live = true;
                }
            }
        }
        if phase == "done" {
            return (page, seen_running);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_the_drop_and_ends_on_the_reports_figures() {
    let Some(binary) = chromium() else {
        eprintln!(
            "\n\n*** SKIPPED: the live page's browser test: chromium is not installed and \
             scripts/install-chromium could not install it (apt-get install chromium) ***\n\n"
        );
        return;
    };
    let shots = std::env::var_os("COUPONRUSH_SCREENSHOTS").map(PathBuf::from);
    let dir = std::env::temp_dir().join(format!(
        "couponrush-dashboard-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("report.json");
    let html_path = dir.join("report.html");
    let port = couponrush_harness::free_port();
    let url = format!("http://127.0.0.1:{port}/");
    // Small, but with a few seconds of drop to watch: the rate keeps the
    // doors open about 4 s, and the stock runs out in the middle. The
    // pictures get a bigger drop, so the page has more to show.
    let (stock, rate, requests) = if shots.is_some() {
        ("8000", "2500", "20000")
    } else {
        ("300", "1000", "4000")
    };
    let argv = vec![
        "coupon-lab".to_string(),
        "demo".into(),
        "--quiet".into(),
        "--stock".into(),
        stock.into(),
        "--rate".into(),
        rate.into(),
        "--requests".into(),
        requests.into(),
        "--dashboard".into(),
        format!("127.0.0.1:{port}"),
        "--dashboard-linger".into(),
        "2m".into(),
        "--json".into(),
        json_path.display().to_string(),
        "--html".into(),
        html_path.display().to_string(),
        "--chart".into(),
        dir.join("chart.svg").display().to_string(),
    ];
    let cancel = CancellationToken::new();
    let demo = tokio::spawn(couponrush_lab::main(Cli::parse_from(argv), cancel.clone()));
    couponrush_harness::wait_for_port(port, Duration::from_secs(30)).expect("the page is served");

    let (b, u, s) = (binary.clone(), url.clone(), shots.clone());
    let (page, seen_running) = tokio::task::spawn_blocking(move || watch(&b, &u, s.as_deref()))
        .await
        .unwrap();
    // The report is written once the deployment has stopped, after the page
    // turned to the end.
    let deadline = Instant::now() + Duration::from_secs(60);
    let report: Report = loop {
        if let Some(r) = std::fs::read(&json_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no JSON report was written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cancel.cancel();
    let verdict = demo.await.unwrap().expect("the demo runs");
    assert_eq!(verdict, Verdict::Pass, "the drop itself passed");

    assert!(seen_running, "the page was live during the drop: {page}");
    let store = report.store.as_ref().expect("the demo audits its store");
    assert_eq!(store.remaining, 0, "the drop sold out");
    assert_eq!(report.issued, u64::from(report.stock));
    assert_eq!(num(&page, "stock_left"), 0.0, "{page}");
    assert_eq!(num(&page, "stock"), f64::from(report.stock), "{page}");
    assert_eq!(num(&page, "issued"), report.issued as f64, "{page}");
    assert_eq!(num(&page, "issued"), f64::from(report.stock), "{page}");
    assert_eq!(num(&page, "accepted"), report.accepted as f64, "{page}");
    assert_eq!(num(&page, "decided"), report.decided as f64, "{page}");
    assert_eq!(num(&page, "late_winners"), report.skew.late_winners as f64);
    let sold_out = report.throughput.sold_out_after_ms.expect("sold out");
    assert!((num(&page, "sold_out") - sold_out).abs() < 1e-6, "{page}");
    assert_eq!(page["verdict"], "PASS");
    for (k, want) in [
        ("oversold", report.oversold),
        ("double_issued", report.double_issued),
        ("lost", report.lost),
        ("phantom", report.phantom),
        ("inconsistent_replays", report.inconsistent_replays),
        ("ledger_mismatch", report.ledger_mismatch),
        ("dlq", report.dlq),
    ] {
        assert_eq!(want, 0, "{k} in the report");
        assert_eq!(
            num(&page["audit"][k], "value"),
            0.0,
            "{k} on the page: {page}"
        );
        assert_eq!(
            page["audit"][k]["class"], "alarm ok",
            "{k} is green: {page}"
        );
    }

    // The HTML report opens offline (a file, nothing served) and shows the
    // same figures.
    let file_url = format!("file://{}", html_path.display());
    let (b, s) = (binary, shots);
    let offline = tokio::task::spawn_blocking(move || {
        let mut browser = Browser::open(&b, &file_url);
        std::thread::sleep(Duration::from_millis(500));
        let page = browser.eval(READ_PAGE);
        if let Some(dir) = s {
            browser.screenshot(&dir.join("dashboard-report.png"));
        }
        page
    })
    .await
    .unwrap();
    assert_eq!(offline["phase"], "done", "{offline}");
    assert_eq!(num(&offline, "stock_left"), 0.0);
    assert_eq!(num(&offline, "issued"), report.issued as f64);
    assert_eq!(offline["verdict"], "PASS");
    let _ = std::fs::remove_dir_all(&dir);
}
