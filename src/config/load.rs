//! Reading configuration text: TOML, `${ENV}` expansion, each section into its typed struct
//! with every error collected (key path and message), then validation.

use super::*;

const SECTIONS: &[&str] = &[
    "server",
    "upstream",
    "route",
    "identity",
    "client",
    "limit",
    "queue",
    "state",
    "adaptive",
    "log",
    "cache",
    "cache_settings",
    "credential",
    "app",
    "usage",
    "discover",
];

/// Environment variable that overrides `[log] format`.
pub const LOG_FORMAT_ENV: &str = "PACER_LOG_FORMAT";

impl Config {
    /// Reads, expands `${ENV}` and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::one("", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text, environment from the process.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Self::parse_with_env(text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates configuration text with an explicit environment.
    pub fn parse_with_env(
        text: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigErrors::one("", format!("invalid TOML: {e}")))?;
        let mut errors = Vec::new();
        env::expand_table(&mut table, "", lookup, &mut errors);

        let mut config = Config::default();
        for (key, value) in table {
            match key.as_str() {
                "server" => section(value, "server", &mut errors, &mut config.server),
                "identity" => section(value, "identity", &mut errors, &mut config.identity),
                "queue" => section(value, "queue", &mut errors, &mut config.queue),
                "state" => section(value, "state", &mut errors, &mut config.state),
                "adaptive" => section(value, "adaptive", &mut errors, &mut config.adaptive),
                "log" => section(value, "log", &mut errors, &mut config.log),
                "usage" => section(value, "usage", &mut errors, &mut config.usage),
                "cache_settings" => section(
                    value,
                    "cache_settings",
                    &mut errors,
                    &mut config.cache_settings,
                ),
                "cache" => config.caches = array(value, "cache", &mut errors),
                "upstream" => config.upstreams = array(value, "upstream", &mut errors),
                "route" => config.routes = array(value, "route", &mut errors),
                "client" => config.clients = array(value, "client", &mut errors),
                "app" => config.apps = array(value, "app", &mut errors),
                "limit" => config.limits = array(value, "limit", &mut errors),
                "credential" => config.credentials = array(value, "credential", &mut errors),
                "discover" => config.discover = typed(value, "discover", &mut errors),
                other => errors.push(ConfigError {
                    path: other.to_string(),
                    message: format!("unknown section, expected one of {}", SECTIONS.join(", ")),
                }),
            }
        }
        // The environment overrides the file's access log format.
        if let Some(f) = lookup(LOG_FORMAT_ENV) {
            match LogFormat::parse(&f) {
                Some(format) => config.log.format = format,
                None => errors.push(ConfigError {
                    path: "log.format".into(),
                    message: format!("{LOG_FORMAT_ENV}={f:?}: expected \"json\" or \"text\""),
                }),
            }
        }
        config.validate(&mut errors);
        config.validate_apps(&mut errors);
        config.resolve_egress(lookup, &mut errors);
        if errors.is_empty() {
            config.limits = presets::with_preset_limits(&config.upstreams, config.limits);
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

fn section<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
    out: &mut T,
) {
    if let Some(v) = typed(value, path, errors) {
        *out = v;
    }
}

fn array<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<T> {
    match value {
        toml::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| typed(item, &format!("{path}[{i}]"), errors))
            .collect(),
        _ => {
            errors.push(ConfigError {
                path: path.to_string(),
                message: format!("must be an array of tables: [[{path}]]"),
            });
            Vec::new()
        }
    }
}

/// Deserializes one table, recording every failing key with its path: after an error the
/// offending key is set aside and the rest is tried again, so one run reports them all.
fn typed<T: DeserializeOwned>(
    mut value: toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    loop {
        match serde_path_to_error::deserialize(value.clone()) {
            Ok(v) => return Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = if inner == "." || inner.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}.{inner}")
                };
                let message = e.into_inner().to_string();
                let message = message.lines().next().unwrap_or_default().to_string();
                errors.push(ConfigError {
                    path: full,
                    message,
                });
                // The first segment names the key of this table that failed.
                let key = inner.split(['.', '[']).next().unwrap_or_default();
                let removed = match value.as_table_mut() {
                    Some(t) if !key.is_empty() && key != "?" => t.remove(key).is_some(),
                    _ => false,
                };
                if !removed {
                    return None;
                }
            }
        }
    }
}
