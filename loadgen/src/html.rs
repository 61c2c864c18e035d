//! The self-contained HTML report: one file, opening offline, with the
//! live page's panels for the whole run (`--html FILE` at the end of a run,
//! `coupon-loadgen html report.json -o report.html` from any JSON report,
//! merged ones too).
//!
//! It is the live page itself, its CSS and JS inlined, with the final
//! [`Snapshot`] (built from the report by [`Snapshot::from_report`])
//! embedded instead of a feed: the same code draws both, so the file shows
//! exactly what the live page showed at the end.

use std::path::PathBuf;

use clap::Args;

use crate::dashboard::Snapshot;
use crate::drive::line::LineReport;
use crate::report::{self, Report};
use crate::Error;

const PAGE_HTML: &str = include_str!("../assets/dashboard.html");
const PAGE_JS: &str = include_str!("../assets/dashboard.js");
const PAGE_CSS: &str = include_str!("../assets/dashboard.css");

/// `coupon-loadgen html`.
#[derive(Debug, Clone, Args)]
pub struct HtmlArgs {
    /// A JSON report (written by --json of run or the demo; a merged one too).
    pub report: PathBuf,
    /// Write the HTML report here.
    #[arg(
        short = 'o',
        long = "output",
        env = "LOADGEN_HTML_OUTPUT",
        default_value = "couponrush-report.html"
    )]
    pub output: PathBuf,
}

/// The report as one HTML page.
pub fn report_html(report: &Report) -> String {
    let data = serde_json::to_string(&Snapshot::from_report(report))
        .expect("a snapshot serialises")
        // Nothing in the data may close the script element it sits in.
        .replace("</", "<\\/");
    let title = format!("couponrush report: {}", escape(&report.event_id));
    PAGE_HTML
        .replace(
            "<title>couponrush live</title>",
            &format!("<title>{title}</title>"),
        )
        .replace(
            r#"<link rel="stylesheet" href="dashboard.css">"#,
            &format!("<style>\n{PAGE_CSS}</style>"),
        )
        .replace(
            r#"<script src="dashboard.js"></script>"#,
            &format!(
                "<script>window.COUPONRUSH_REPORT = {data};</script>\n<script>\n{}</script>",
                PAGE_JS.replace("</script", "<\\/script")
            ),
        )
}

/// Reads the JSON report at `path`.
pub fn read_report(path: &PathBuf) -> Result<Report, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::File {
        doing: "read",
        path: path.clone(),
        source,
    })?;
    // A line run's report holds its drop's report (and the line's figures,
    // which become its notes).
    let r: Report = match serde_json::from_slice::<LineReport>(&bytes) {
        Ok(line) => line.drop_with_line_notes(),
        Err(_) => serde_json::from_slice(&bytes).map_err(|e| Error::NotAReport {
            path: path.clone(),
            problem: e.to_string(),
        })?,
    };
    if r.schema != report::SCHEMA {
        return Err(Error::NotAReport {
            path: path.clone(),
            problem: format!(
                "its schema is {}, this version reads {}",
                r.schema,
                report::SCHEMA
            ),
        });
    }
    Ok(r)
}

/// Writes the HTML report of `report` to `path`.
pub fn write(report: &Report, path: &PathBuf) -> Result<(), Error> {
    std::fs::write(path, report_html(report)).map_err(|source| Error::File {
        doing: "write",
        path: path.clone(),
        source,
    })
}

/// Runs `coupon-loadgen html`.
pub fn html(args: &HtmlArgs) -> Result<(), Error> {
    let report = read_report(&args.report)?;
    write(&report, &args.output)?;
    println!("HTML report written to {}", args.output.display());
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_inlines_its_assets_and_loads_nothing() {
        let report: Report = serde_json::from_str(include_str!("../assets/sample-report.json"))
            .expect("the sample is a report");
        let page = report_html(&report);
        assert!(page.contains("window.COUPONRUSH_REPORT = {"));
        assert!(!page.contains("src=\""), "no external script");
        assert!(
            !page.contains("href=\"dashboard.css\""),
            "no external style"
        );
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "nothing fetched"
        );
        // The embedded data never closes its script element early.
        let data_end = page.find("window.COUPONRUSH_REPORT").unwrap();
        let rest = &page[data_end..];
        assert!(rest.find("</script>").unwrap() > rest.find("\"stock\"").unwrap());
    }

    #[test]
    fn a_line_run_writes_its_html_report_and_its_json_turns_into_one() {
        use crate::drive::line::{LineFigures, LineReport};
        use crate::OutputArgs;
        let drop: Report = serde_json::from_str(include_str!("../assets/sample-report.json"))
            .expect("the sample is a report");
        let line = LineReport {
            drop,
            line: LineFigures {
                backend: "redis".into(),
                admitted: 1234,
                ..LineFigures::default()
            },
            passed: true,
        };
        let dir = std::env::temp_dir().join(format!("couponrush-line-html-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (json, html, chart) = (dir.join("l.json"), dir.join("l.html"), dir.join("l.svg"));
        let out = OutputArgs {
            json: Some(json.clone()),
            chart: Some(chart.clone()),
            html: Some(html.clone()),
            no_raw: false,
            quiet: true,
        };
        out.emit_line(&line).expect("written");
        let page = std::fs::read_to_string(&html).expect("--html is honoured by a line run");
        assert!(
            page.contains("couponrush line report: backend redis"),
            "the line's figures are in the notes"
        );
        assert!(std::fs::read_to_string(&chart).unwrap().starts_with("<svg"));
        // `coupon-loadgen html` reads a line run's JSON as its drop plus the line's notes.
        let again = read_report(&json).expect("a line report is read");
        assert_eq!(report_html(&again), page);
        std::fs::remove_dir_all(&dir).ok();
    }
}
