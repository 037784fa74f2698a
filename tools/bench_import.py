"""Benchmark of import_douban.py on a DMSC-sized input: wall time and peak memory of the import process.

A synthetic file in the DMSC layout (``DMSC.csv``'s exact header; by default 2,000,000 rows, 28 films, 250,000
users with a skewed number of comments each, generated Chinese texts that start with a space like the real
file's, dates 2009-2017) is written into a temporary folder (never kept), then ``import_douban.py`` imports it
in a fresh process into a folder of one file per user. Reported: rows and size of the input, the import's wall
time, its peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it exits) against the input size,
its CPU time (wall time on a machine whose disk others share is mostly waiting for file creation: ``--tmp
/dev/shm`` takes the disk out), and the import's own summary. Target (issue 25): < 60 s and < 2.5 GB on 2 cores.

    python tools/bench_import.py
    flock /tmp/heavy.lock python tools/bench_import.py --rows 2000000   # on a shared machine
    python tools/bench_import.py --rows 100000 --users 20000           # a quick look
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ["ID", "Movie_Name_EN", "Movie_Name_CN", "Crawl_Date", "Number", "Username", "Date", "Star", "Comment",
          "Like"]
FILMS = [(f"Film {i}", name) for i, name in enumerate(
    "大鱼海棠 美人鱼 疯狂动物城 复仇者联盟 钢铁侠 寻龙诀 港囧 夏洛特烦恼 西游记之大圣归来 小时代 泰囧 后会无期 "
    "心花路放 智取威虎山 捉妖记 煎饼侠 老炮儿 湄公河行动 七月与安生 从你的全世界路过 湄公河 北京遇上西雅图 "
    "致我们终将逝去的青春 栀子花开 左耳 匆匆那年 十二生肖 变形金刚".split())]
CHARS = ("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然"
         "于心学么之都好看电影剧情演员导演画面特效故事感觉喜欢失望结局配乐真的还是不错一般无聊感动笑哭经典")


def write_dmsc(path: str, rows: int, users: int, seed: int) -> None:
    """``rows`` comments in the DMSC layout; user k gets about rows / sqrt(k * users) of them (a long tail)."""
    rng = random.Random(seed)
    pool = [" " + "".join(rng.choices(CHARS, k=rng.randint(4, 60))) for _ in range(50_000)]
    start = date(2009, 1, 1)
    days = [(start + timedelta(days=d)).isoformat() for d in range(2900)]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        for i in range(rows):
            en, cn = FILMS[rng.randrange(len(FILMS))]
            user = int(users * rng.random() ** 2)
            writer.writerow([i, en, cn, "2017-01-22", i % 1000, f"用户{user}", days[rng.randrange(len(days))],
                             rng.randint(1, 5), pool[rng.randrange(len(pool))], rng.randrange(100)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=250_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", help="folder for the input and output (default: the system's temporary folder; "
                                      "/dev/shm takes a busy disk out of the measurement)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_import_", dir=args.tmp) as tmp:
        source = os.path.join(tmp, "DMSC.csv")
        t0 = time.perf_counter()
        write_dmsc(source, args.rows, args.users, args.seed)
        size = os.path.getsize(source)
        print(f"input: {args.rows:,} rows, {size / 2**20:,.0f} MiB ({time.perf_counter() - t0:.1f} s to generate)")
        out = os.path.join(tmp, "users")
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, os.path.join(REPO, "import_douban.py"), source, "--output", out],
                                capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = usage.ru_maxrss * 1024  # KiB on Linux
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        files = len(os.listdir(out))
        print(f"import: {elapsed:.1f} s wall ({usage.ru_utime:.1f} s user + {usage.ru_stime:.1f} s system CPU), "
              f"peak RSS {peak / 2**30:.2f} GiB ({peak / size:.1f}x the input file), {files:,} user files, "
              f"{os.cpu_count()} CPUs, in {tmp}")
        print("----- the import's summary -----\n" + result.stdout.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
