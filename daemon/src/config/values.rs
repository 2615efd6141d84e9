//! Value types of the config file, each parsed from the text people write.

use std::fmt;

use gpuctl_protocol::units::{parse_bytes, parse_duration};
use gpuctl_protocol::KeepAlive;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Unix permission bits, written `"0660"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

/// A byte count, written `"16MiB"` or as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

/// A duration, written `"5s"`, `"500ms"`, `"1h30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

/// `keep_alive`: a duration, `"0s"` (unload when idle) or `"forever"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAliveSetting(pub KeepAlive);

/// A `tracing` filter such as `"info"` or `"gpuctld=debug,info"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(pub String);

/// Where a model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Device {
    /// The GPU with the most free memory, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// `cuda` (`None`: any GPU) or `cuda:N`.
    Cuda(Option<u32>),
}

/// An image size, written `"896x1152"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Pixels across.
    pub width: u32,
    /// Pixels down.
    pub height: u32,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// Deserializes a string with `parse`, the message naming what was expected.
struct Parsed<F>(&'static str, F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for Parsed<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.1)(text).map_err(E::custom)
    }
}

fn parsed<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_str(Parsed(expecting, parse))
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, "an octal mode string such as \"0660\"", |text| {
            u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|mode| *mode <= 0o777)
                .map(Mode)
                .ok_or_else(|| {
                    format!(
                        "invalid mode {text:?}: expected octal permission bits such as \"0660\""
                    )
                })
        })
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, "a size such as \"16MiB\"", |text| {
            parse_bytes(text).map(Bytes)
        })
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, "a duration such as \"30s\"", |text| {
            parse_duration(text).map(Duration)
        })
    }
}

impl<'de> Deserialize<'de> for KeepAliveSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(
            d,
            "a duration such as \"5m\", \"0s\" or \"forever\"",
            |text| {
                if text == "forever" {
                    return Ok(KeepAliveSetting(KeepAlive::Forever));
                }
                let duration = parse_duration(text).map_err(|e| format!("{e}, or \"forever\""))?;
                let millis = u64::try_from(duration.as_millis())
                    .map_err(|_| "keep_alive is too long".to_owned())?;
                Ok(KeepAliveSetting(KeepAlive::Millis(millis)))
            },
        )
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, "a log filter such as \"info\"", |text| {
            const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
            let problem = || {
                format!("invalid log filter {text:?}: use error, warn, info, debug or trace, or TARGET=LEVEL pairs such as \"gpuctld=debug,info\"")
            };
            // A bare word would be read by tracing as a target name and
            // silently log nothing useful, so each part must name a level.
            let levels_ok = text.split(',').all(|part| {
                let level = part.rsplit_once('=').map_or(part, |(_, level)| level);
                LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
            });
            if !levels_ok {
                return Err(problem());
            }
            tracing_subscriber::EnvFilter::builder()
                .parse(text)
                .map(|_| LogLevel(text.to_owned()))
                .map_err(|_| problem())
        })
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"", |text| {
            match text {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Device::Cuda(Some(n)))
                .ok_or_else(|| format!("invalid device {other:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")),
        }
        })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, "a size such as \"896x1152\"", |text| {
            let problem =
                || format!("invalid size {text:?}: expected WIDTHxHEIGHT such as \"896x1152\"");
            let (w, h) = text.split_once('x').ok_or_else(problem)?;
            let width: u32 = w.trim().parse().map_err(|_| problem())?;
            let height: u32 = h.trim().parse().map_err(|_| problem())?;
            if width == 0 || height == 0 {
                return Err(problem());
            }
            Ok(Size { width, height })
        })
    }
}
