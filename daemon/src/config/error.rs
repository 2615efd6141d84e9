//! Config errors name the file, the key and the problem.

use std::fmt;

/// A configuration that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file (or `<embedded default config>`).
    pub origin: String,
    /// The dotted key, such as `models.portrait.tile`, when one is at fault.
    pub key: Option<String>,
    /// What is wrong.
    pub problem: String,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl ConfigError {
    pub(crate) fn unreadable(origin: String, error: std::io::Error) -> Self {
        ConfigError {
            origin,
            key: None,
            problem: format!("cannot read the file: {error}"),
            location: None,
        }
    }

    pub(crate) fn syntax(origin: &str, text: &str, error: &toml::de::Error) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            key: None,
            problem: format!("invalid TOML: {}", error.message().trim()),
            location: error.span().map(|span| line_column(text, span.start)),
        }
    }

    pub(crate) fn field(
        origin: &str,
        text: &str,
        error: serde_path_to_error::Error<toml::de::Error>,
    ) -> Self {
        let path = error.path().to_string();
        let inner = error.inner();
        let problem = inner.message().trim().to_owned();
        let key = match path.as_str() {
            "." | "" => None,
            key => Some(key.to_owned()),
        };
        ConfigError {
            origin: origin.to_owned(),
            key,
            problem,
            location: inner.span().map(|span| line_column(text, span.start)),
        }
    }

    pub(crate) fn invalid(origin: &str, key: &str, problem: String) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            key: Some(key.to_owned()),
            problem,
            location: None,
        }
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
