//! The table file source: re-applied on every change.

use std::{path::Path, time::Duration};

use slog::{Logger, info, warn};
use socklb_table::Table;

use crate::client::AgentClient;

/// Applies the table file at `path` on every change until the future is
/// dropped, and checks the agent's health in between, so a restarted agent
/// gets the table again within about `interval`. A bad file is reported
/// and leaves the agent's table as it was.
pub async fn watch_file(client: &mut AgentClient, path: &Path, interval: Duration, log: &Logger) {
    let mut applied: Option<String> = None;
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) if applied.as_ref() != Some(&text) => match Table::parse(&text) {
                Ok(table) => match client.sync(table).await {
                    Ok(result) => {
                        info!(log, "table applied"; "file" => path.display().to_string(),
                              "services" => result.services, "generation" => result.generation);
                        applied = Some(text);
                    }
                    Err(err) => {
                        warn!(log, "table not applied; retrying"; "error" => err.to_string())
                    }
                },
                Err(err) => {
                    warn!(log, "table file refused; the agent keeps its table"; "error" => err.to_string());
                    applied = Some(text);
                }
            },
            Ok(_) => {
                if let Err(err) = client.check().await {
                    warn!(log, "agent health check failed"; "error" => err.to_string());
                }
            }
            Err(err) => {
                warn!(log, "cannot read the table file"; "file" => path.display().to_string(),
                              "error" => err.to_string())
            }
        }
        tokio::time::sleep(interval).await;
    }
}
