//! A strict reader of the Prometheus text exposition (as
//! `prometheus_client` writes it: OpenMetrics 1.0 text), so tests can check
//! that `/metrics` is well formed and read values from it.
//!
//! Every line must be `# HELP <name> <text>`, `# TYPE <name> <type>`, a
//! sample `<name>[{<label>="<value>",…}] <float>`, or the final `# EOF`.
//! A sample must belong to a family declared by `# TYPE` before it, with a
//! suffix its type allows, and no series may appear twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{anyhow, bail, Context, Result};

/// One series' value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Family name -> its type.
    pub types: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses `text`, rejecting anything that is not well formed.
    pub fn parse(text: &str) -> Result<Self> {
        let body = text
            .strip_suffix("# EOF\n")
            .context("the exposition must end with `# EOF`")?;
        let mut scrape = Self::default();
        let mut seen = HashSet::new();
        for (index, line) in body.lines().enumerate() {
            let number = index + 1;
            scrape
                .read_line(line, &mut seen)
                .with_context(|| format!("line {number}: {line:?}"))?;
        }
        Ok(scrape)
    }

    fn read_line(&mut self, line: &str, seen: &mut HashSet<String>) -> Result<()> {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _help) = rest.split_once(' ').unwrap_or((rest, ""));
            check_name(name)?;
            return Ok(());
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE without a type")?;
            check_name(name)?;
            const TYPES: [&str; 8] = [
                "counter",
                "gauge",
                "histogram",
                "gaugehistogram",
                "summary",
                "info",
                "stateset",
                "unknown",
            ];
            if !TYPES.contains(&kind) {
                bail!("unknown type {kind:?}");
            }
            if self.types.insert(name.into(), kind.into()).is_some() {
                bail!("family {name} declared twice");
            }
            return Ok(());
        }
        if line.starts_with('#') {
            bail!("not a HELP, TYPE or EOF line");
        }
        let sample = parse_sample(line)?;
        self.check_family(&sample.name)?;
        let series = format!("{}{:?}", sample.name, sample.labels);
        if !seen.insert(series) {
            bail!("series repeated");
        }
        self.samples.push(sample);
        Ok(())
    }

    /// The sample's name must be a declared family plus a suffix its type
    /// allows.
    fn check_family(&self, name: &str) -> Result<()> {
        let allowed: &[&str] = &[
            "", "_total", "_created", "_bucket", "_sum", "_count", "_info",
        ];
        for suffix in allowed {
            let Some(family) = name.strip_suffix(suffix) else {
                continue;
            };
            let Some(kind) = self.types.get(family) else {
                continue;
            };
            let fits = match kind.as_str() {
                "counter" => matches!(*suffix, "_total" | "_created"),
                "histogram" | "gaugehistogram" => {
                    matches!(*suffix, "_bucket" | "_sum" | "_count" | "_created")
                }
                "summary" => matches!(*suffix, "" | "_sum" | "_count" | "_created"),
                "info" => *suffix == "_info",
                _ => suffix.is_empty(),
            };
            if fits {
                return Ok(());
            }
        }
        bail!("sample {name} belongs to no declared family")
    }

    /// The sum of the samples named `name` whose labels include `labels`
    /// (0 when there is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether a sample named `name` with `labels` exists.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(anyhow!("bad metric name {name:?}"))
    }
}

fn check_label_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(anyhow!("bad label name {name:?}"))
    }
}

/// `name[{labels}] value`, nothing more (no timestamp, no exemplar).
fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).context("a sample needs a value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let value = rest
        .strip_prefix(' ')
        .context("a single space must separate the value")?;
    let value = parse_value(value)?;
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

/// Reads `k="v",…}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(mut text: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str> {
    if let Some(rest) = text.strip_prefix('}') {
        return Ok(rest);
    }
    loop {
        let (name, after) = text.split_once("=\"").context("a label needs =\"value\"")?;
        check_label_name(name)?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => bail!("bad escape {other:?} in a label value"),
                },
                Some((at, '"')) => break at,
                Some((_, '\n')) => bail!("newline in a label value"),
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        if labels.insert(name.into(), value).is_some() {
            bail!("label {name} repeated");
        }
        let rest = &after[end + 1..];
        if let Some(rest) = rest.strip_prefix('}') {
            return Ok(rest);
        }
        text = rest
            .strip_prefix(',')
            .context("labels are separated by commas")?;
    }
}

fn parse_value(text: &str) -> Result<f64> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => {
            // Rust also reads "inf", "infinity" and "nan" in any case; the
            // format spells them only as above.
            let plain = text
                .bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
            if !plain || text.is_empty() {
                bail!("bad value {text:?}");
            }
            text.parse().map_err(|e| anyhow!("bad value {text:?}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP edge_frames_in Frames received.\n\
# TYPE edge_frames_in counter\n\
edge_frames_in_total{type=\"send\"} 3\n\
edge_frames_in_total{type=\"a \\\"q\\\" \\\\ \\n\"} 1\n\
# TYPE edge_connections gauge\n\
edge_connections 2\n\
# HELP edge_send_seconds Send latency.\n\
# TYPE edge_send_seconds histogram\n\
edge_send_seconds_sum 0.25\n\
edge_send_seconds_count 2\n\
edge_send_seconds_bucket{le=\"0.1\"} 1\n\
edge_send_seconds_bucket{le=\"+Inf\"} 2\n\
# EOF\n";

    #[test]
    fn reads_well_formed_text() {
        let scrape = Scrape::parse(GOOD).unwrap();
        assert_eq!(scrape.sum("edge_frames_in_total", &[("type", "send")]), 3.0);
        assert_eq!(
            scrape.sum("edge_frames_in_total", &[("type", "a \"q\" \\ \n")]),
            1.0
        );
        assert_eq!(scrape.sum("edge_frames_in_total", &[]), 4.0);
        assert_eq!(scrape.sum("edge_connections", &[]), 2.0);
        assert!(scrape.has("edge_send_seconds_bucket", &[("le", "+Inf")]));
        assert!(!scrape.has("edge_frames_out_total", &[]));
    }

    #[test]
    fn rejects_anything_else() {
        let bad = [
            // No EOF, or something after it.
            GOOD.trim_end_matches("# EOF\n"),
            "# EOF\nx 1\n",
            // Undeclared family, or a suffix its type does not have.
            "x 1\n# EOF\n",
            "# TYPE x counter\nx 1\n# EOF\n",
            "# TYPE x gauge\nx_total 1\n# EOF\n",
            // Malformed lines.
            "# TYPE x gauge\nx\n# EOF\n",
            "# TYPE x gauge\nx  1\n# EOF\n",
            "# TYPE x gauge\nx 1 1700000000\n# EOF\n",
            "# TYPE x gauge\nx one\n# EOF\n",
            "# TYPE x gauge\nx inf\n# EOF\n",
            "# TYPE x gauge\nx{a=\"1\" 1\n# EOF\n",
            "# TYPE x gauge\nx{a=1} 1\n# EOF\n",
            "# TYPE x gauge\nx{a=\"1\",a=\"2\"} 1\n# EOF\n",
            "# TYPE x gauge\nx{a=\"\\x\"} 1\n# EOF\n",
            "# TYPE x gauge\nx{1a=\"1\"} 1\n# EOF\n",
            "# TYPE x gauge\nx 1\nx 2\n# EOF\n",
            "# TYPE x widget\n# EOF\n",
            "# TYPE x gauge\n# TYPE x gauge\n# EOF\n",
            "# UNIT x seconds\n# EOF\n",
            "# a comment\n# EOF\n",
            "\n# EOF\n",
            "# TYPE 1x gauge\n# EOF\n",
        ];
        for text in bad {
            assert!(Scrape::parse(text).is_err(), "accepted {text:?}");
        }
    }
}
