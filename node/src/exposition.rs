//! The two exposition formats `/metrics` speaks. prometheus-client writes OpenMetrics 1.0; a
//! scraper that asks for the classic Prometheus text format (0.0.4), or asks for nothing in
//! particular, gets it converted, because the two differ where tools notice: a counter's
//! `# HELP`/`# TYPE` name carries `_total` in the classic format (promtool reports "no help
//! text" otherwise), `_created` samples, `# UNIT` lines, exemplars and `# EOF` are OpenMetrics
//! only, and `info`/`stateset` are not classic types.

/// What a `/metrics` response is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Text,
}

impl Format {
    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The format an `Accept` header prefers: OpenMetrics only when it is asked for at least as
/// strongly as the classic text (Prometheus itself sends both, OpenMetrics with the higher
/// `q`); no header, `*/*` or anything else gets the classic text, as curl and older scrapers
/// expect.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text;
    };
    let (mut om, mut text) = (None::<f32>, None::<f32>);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|v| v.parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut om,
            "text/plain" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    match (om, text) {
        (Some(o), t) if o > 0.0 && o >= t.unwrap_or(0.0) => Format::OpenMetrics,
        _ => Format::Text,
    }
}

/// Rewrites OpenMetrics text (as prometheus-client writes it) in the classic text format.
pub fn to_text(openmetrics: &str) -> String {
    // prometheus-client writes HELP before TYPE, and HELP must carry TYPE's classic name.
    let kinds: std::collections::HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    let family_of = |name: &str| Family::of(name, kinds.get(name).copied().unwrap_or("unknown"));
    let mut out = String::with_capacity(openmetrics.len());
    // The family whose samples follow.
    let mut family = Family::default();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = family_of(rest.split_once(' ').map_or(rest, |(n, _)| n));
            out.push_str(&format!(
                "# TYPE {} {}\n",
                family.text_name, family.text_type
            ));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // OpenMetrics escapes `"` in HELP too; the classic format only `\` and newlines.
            let help = help.replace("\\\"", "\"");
            out.push_str(&format!("# HELP {} {help}\n", family_of(name).text_name));
            continue;
        }
        // `# EOF`, `# UNIT` and anything else commented: OpenMetrics only.
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        // A sample: `name{labels} value [timestamp] [# exemplar]`.
        let sample = line.find(" # ").map_or(line, |i| &line[..i]);
        let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
        let name = &sample[..name_end];
        if family.drops(name) {
            continue;
        }
        if family.kind == "info" && name == family.om_name {
            out.push_str(&family.text_name);
            out.push_str(&sample[name_end..]);
        } else {
            out.push_str(sample);
        }
        out.push('\n');
    }
    out
}

#[derive(Debug, Clone, Default)]
struct Family {
    om_name: String,
    kind: String,
    text_name: String,
    text_type: &'static str,
}

impl Family {
    fn of(name: &str, kind: &str) -> Family {
        let (text_name, text_type) = match kind {
            "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
            "counter" => (name.to_string(), "counter"),
            "gauge" | "stateset" => (name.to_string(), "gauge"),
            "histogram" | "gaugehistogram" => (name.to_string(), "histogram"),
            "summary" => (name.to_string(), "summary"),
            "info" => (format!("{name}_info"), "gauge"),
            _ => (name.to_string(), "untyped"),
        };
        Family {
            om_name: name.to_string(),
            kind: kind.to_string(),
            text_name,
            text_type,
        }
    }

    /// Samples the classic format has no place for.
    fn drops(&self, sample: &str) -> bool {
        matches!(self.kind.as_str(), "counter" | "histogram" | "summary")
            && sample
                .strip_prefix(self.om_name.as_str())
                .is_some_and(|rest| rest == "_created")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP edgetwin_patches Twin patches applied.\n\
# TYPE edgetwin_patches counter\n\
edgetwin_patches_total{side=\"desired\"} 3\n\
edgetwin_patches_created{side=\"desired\"} 1700000000.0\n\
# HELP edgetwin_outbox_bytes Bytes in the \\\"outbox\\\".\n\
# TYPE edgetwin_outbox_bytes gauge\n\
# UNIT edgetwin_outbox_bytes bytes\n\
edgetwin_outbox_bytes 42\n\
# HELP edgetwin_commit_seconds Commit time.\n\
# TYPE edgetwin_commit_seconds histogram\n\
edgetwin_commit_seconds_sum 0.5\n\
edgetwin_commit_seconds_count 2\n\
edgetwin_commit_seconds_bucket{le=\"+Inf\"} 2 # {trace=\"x\"} 0.3\n\
# HELP edgetwin_build Build.\n\
# TYPE edgetwin_build info\n\
edgetwin_build{version=\"0.1.0\"} 1\n\
# EOF\n";

    #[test]
    fn classic_text_names_counters_with_total_and_drops_what_only_openmetrics_has() {
        let text = to_text(OM);
        let expected = "# HELP edgetwin_patches_total Twin patches applied.\n\
# TYPE edgetwin_patches_total counter\n\
edgetwin_patches_total{side=\"desired\"} 3\n\
# HELP edgetwin_outbox_bytes Bytes in the \"outbox\".\n\
# TYPE edgetwin_outbox_bytes gauge\n\
edgetwin_outbox_bytes 42\n\
# HELP edgetwin_commit_seconds Commit time.\n\
# TYPE edgetwin_commit_seconds histogram\n\
edgetwin_commit_seconds_sum 0.5\n\
edgetwin_commit_seconds_count 2\n\
edgetwin_commit_seconds_bucket{le=\"+Inf\"} 2\n\
# HELP edgetwin_build_info Build.\n\
# TYPE edgetwin_build_info gauge\n\
edgetwin_build_info{version=\"0.1.0\"} 1\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn openmetrics_only_when_asked_for_at_least_as_strongly_as_text() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.2")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(negotiate(Some("garbage;;;q=x,")), Format::Text);
    }
}
