//! Prometheus text exposition, parsed into samples.

/// One sample of a Prometheus text exposition.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus text exposition, as pacer writes it (no timestamps). Label
/// values are unescaped; a malformed label fails the test.
pub fn prom_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let mut labels = Vec::new();
        if line[name_end..].starts_with('{') {
            let mut chars = line[name_end + 1..].chars().peekable();
            loop {
                while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
                    chars.next();
                }
                if chars.peek() == Some(&'}') || chars.peek().is_none() {
                    break;
                }
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "label {key} in {line}");
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => break,
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.push((key, value));
            }
        }
        let value = line
            .trim()
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("sample without a value: {line}"));
        out.push(Sample {
            name: line[..name_end].to_string(),
            labels,
            value,
        });
    }
    out
}

/// Sum of every sample of `name` whose labels include all of `want`.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    prom_samples(text)
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}
