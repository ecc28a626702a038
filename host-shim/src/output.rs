//! How socklb-shim's read commands print (`-o`): tables for people, with
//! more columns at `-o wide` as kubectl's, or JSON or YAML for programs.
//! The one table printer of the agent's views and of `node status`.

use serde::Serialize;

/// What a read command prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables for people
    #[default]
    Table,
    /// The tables with every column
    Wide,
    Json,
    Yaml,
}

impl Output {
    /// `data` as JSON or YAML, or for people what `tables` writes, told
    /// whether to write every column.
    pub fn render<T: Serialize + ?Sized>(
        self,
        data: &T,
        tables: impl FnOnce(bool) -> String,
    ) -> anyhow::Result<String> {
        Ok(match self {
            Output::Table => tables(false),
            Output::Wide => tables(true),
            Output::Json => serde_json::to_string_pretty(data)? + "\n",
            Output::Yaml => serde_yaml::to_string(data)?,
        })
    }
}

/// A column of a table for people.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    name: &'static str,
    wide_only: bool,
}

impl Column {
    pub const fn new(name: &'static str) -> Self {
        Column {
            name,
            wide_only: false,
        }
    }

    /// A column shown only at `-o wide`.
    pub const fn wide(name: &'static str) -> Self {
        Column {
            name,
            wide_only: true,
        }
    }
}

/// `rows` under `header`, each column as wide as its widest cell, two
/// spaces apart; the wide-only columns only when `wide`.
pub fn table<const N: usize>(header: [Column; N], rows: &[[String; N]], wide: bool) -> String {
    let shown: Vec<usize> = (0..N)
        .filter(|&column| wide || !header[column].wide_only)
        .collect();
    let mut widths = header.map(|column| column.name.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let padded: Vec<String> = shown
            .iter()
            .map(|&column| format!("{:<width$}", cells[column], width = widths[column]))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.map(|column| column.name));
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: [Column; 3] = [
        Column::new("NAME"),
        Column::wide("ADDRESS"),
        Column::new("STATE"),
    ];

    fn rows() -> Vec<[String; 3]> {
        vec![
            [
                "web-0".into(),
                "unix:///run/a.sock".into(),
                "in_sync".into(),
            ],
            ["api".into(), "-".into(), "failing".into()],
        ]
    }

    #[test]
    fn columns_line_up_and_wide_ones_show_only_at_wide() {
        assert_eq!(
            table(HEADER, &rows(), false),
            "NAME   STATE\n\
             web-0  in_sync\n\
             api    failing\n"
        );
        assert_eq!(
            table(HEADER, &rows(), true),
            "NAME   ADDRESS             STATE\n\
             web-0  unix:///run/a.sock  in_sync\n\
             api    -                   failing\n"
        );
    }

    #[test]
    fn data_is_json_or_yaml_and_tables_are_told_how_wide() {
        let data = serde_json::json!({"services": [{"vip": "10.96.0.20", "port": 80}]});
        let tables = |wide: bool| format!("wide: {wide}");
        assert_eq!(Output::Table.render(&data, tables).unwrap(), "wide: false");
        assert_eq!(Output::Wide.render(&data, tables).unwrap(), "wide: true");
        let json = Output::Json.render(&data, tables).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json).unwrap(),
            data
        );
        let yaml = Output::Yaml.render(&data, tables).unwrap();
        assert_eq!(
            yaml, "services:\n- port: 80\n  vip: 10.96.0.20\n",
            "not YAML: {yaml}"
        );
    }
}
