"""Several daemons on 127.0.0.1 ports behind one nginx upstream (the shipped site with its
upstream listing them): stopping one with SIGTERM while a client runs loses no request."""

import signal
import subprocess
import threading

from conftest import Daemon, Site, can_connect, free_port, nginx_binary, wait_for
from test_ops_files import nginx_conf, site_conf

import http.client


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_stopping_one_of_two_daemons_loses_no_request(tmp_path):
    site = Site(tmp_path / "www")
    site.write("who.lua", "function main(env, con) con:puts(con:config('listen')) end")
    daemons = [Daemon(tmp_path / f"d{i}", {"listen": f"127.0.0.1:{free_port()}"})
               for i in range(2)]
    for d in daemons:
        d.start()
    site_text, port = site_conf(tmp_path, servers=[d.settings["listen"] for d in daemons])
    conf, prefix = nginx_conf(tmp_path, site_text)
    nginx = subprocess.Popen([nginx_binary(), "-c", conf, "-p", prefix],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results, done = [], threading.Event()

    def client():
        while not done.is_set():
            results.append(get(port, "/who.lua"))

    try:
        wait_for(lambda: can_connect(("127.0.0.1", port)), what="nginx")
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: {b for _, b in results} >= {d.settings["listen"].encode()
                                                     for d in daemons},
                 what="both daemons to serve")
        assert daemons[0].stop() == 0
        stopped_at = len(results)
        wait_for(lambda: len(results) > stopped_at + 200, timeout=30,
                 what="requests after the stop")
        done.set()
        for thread in threads:
            thread.join()
    finally:
        done.set()
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        for d in daemons:
            d.stop()
    failures = [r for r in results if r[0] != 200]
    assert failures == [], failures[:5]
    assert {b for _, b in results[stopped_at + 50:]} == {daemons[1].settings["listen"].encode()}
