//! What goes wrong with a table, naming the service and the field.

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read table file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("table file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("service {service}: {field}: {message}")]
    Field {
        service: String,
        field: String,
        message: String,
    },
    #[error("service {key} is not programmed")]
    UnknownService { key: String },
    #[error("table has {count} {what}; the datapath holds at most {limit}")]
    Capacity {
        what: &'static str,
        count: usize,
        limit: usize,
    },
}
