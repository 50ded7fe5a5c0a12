//! What the formats crate's end-to-end tests share (the main crate's
//! tests include this file too, by path).

use std::path::Path;

/// True once `socket` is a listening Unix socket (`/proc/net/unix` flag
/// `__SO_ACCEPTCON`): the file appears at `bind()`, before `listen()`, and a
/// connect in between is refused. Probing by connecting instead would use
/// up a server that serves one client.
pub fn listening(socket: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return socket.exists();
    };
    let want = socket.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x0001_0000 != 0)
    })
}
