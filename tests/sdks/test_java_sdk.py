"""The generated Java SDK compiles offline (javac against the Jackson jars Debian packages) and,
run by ``java``, calls a running server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, multi_policy_schema, running_server

from policy_server.gateway.app import build_app
from policy_server.sdks import ClientSDKs
from policy_server.sdks.java import JAVA_CLASSPATH_JARS
from policy_server.settings import Settings

JARS = Path("/usr/share/java")
MAIN = """
import java.math.BigDecimal;
import java.util.Collections;
import java.util.Map;
import policyserver.client.ApiClient;
import policyserver.client.ApiException;
import policyserver.client.api.LpocApi;
import policyserver.client.model.*;

public class Main {
  static ApiClient client(String url, String key) {
    ApiClient client = new ApiClient();
    client.updateBaseUri(url);
    client.setRequestInterceptor(request -> request.header("access-token", key));
    return client;
  }

  public static void main(String[] args) throws Exception {
    ApiClient client = client(args[0], args[1]);
    LpocApi api = new LpocApi(client);
    LpocObservation obs = client.getObjectMapper().readValue(args[2], LpocObservation.class);
    ActionResponse action = api.predict(obs);
    DistributionResponse distribution = api.distribution(obs);
    ActionResponse raw = api.predictRaw(new LpocRawObservation().obs(Collections.nCopies(11, new BigDecimal("0.5"))));
    int denied = 0;
    try {
      new LpocApi(client(args[0], "wrong-key")).predict(obs);
    } catch (ApiException e) {
      denied = e.getCode();
    }
    System.out.println(client.getObjectMapper().writeValueAsString(
        Map.of("action", action, "distribution", distribution, "raw", raw, "denied", denied)));
  }
}
"""
INSTALL = (
    ".ci/packages.txt lists them; install with `apt-get install default-jdk-headless "
    "libjackson2-databind-java libjsr305-java libgeronimo-annotation-1.3-spec-java`"
)


def test_the_java_sdk_compiles_with_javac(model_dir: Path, tmp_path: Path) -> None:
    missing = [tool for tool in ("java", "javac") if shutil.which(tool) is None]
    assert not missing, f"{' and '.join(missing)} not found on PATH: a JDK is missing; {INSTALL}"
    absent = [jar for jar in JAVA_CLASSPATH_JARS if not (JARS / jar).is_file()]
    assert not absent, f"{', '.join(absent)} not in {JARS}: Debian's Java libraries are missing; {INSTALL}"

    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(multi_policy_schema(model_dir)))
    app = build_app(Settings(schema_path=tmp_path / "schema.yaml", backend="local", gateway_metrics_port=0))
    sdks = ClientSDKs(tmp_path / "cache", languages=["java"])
    progress = sdks.generate(app.openapi())
    assert progress.languages == {"java": "done"}, progress.notes
    sources = sorted(str(p) for p in sdks.export(tmp_path / "clients").glob("java/src/main/java/**/*.java"))
    assert any(s.endswith("policyserver/client/api/LpocApi.java") for s in sources)

    classpath = ":".join(str(JARS / jar) for jar in JAVA_CLASSPATH_JARS)
    (tmp_path / "Main.java").write_text(MAIN)
    (tmp_path / "sources.txt").write_text("\n".join([*sources, str(tmp_path / "Main.java")]))
    javac = subprocess.run(
        [
            "javac",
            "-nowarn",
            "-d",
            str(tmp_path / "classes"),
            "-cp",
            classpath,
            f"@{tmp_path / 'sources.txt'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert javac.returncode == 0, javac.stderr[-4000:]
    assert (tmp_path / "classes/policyserver/client/api/LpocApi.class").is_file()

    # the compiled SDK, run by java, against a running server
    with running_server(app) as url:
        run = subprocess.run(
            ["java", "-cp", f"{tmp_path / 'classes'}:{classpath}", "Main", url, API_KEY, json.dumps(LPOC_OBS)],
            check=False, capture_output=True, text=True, timeout=120,
        )
    assert run.returncode == 0, run.stderr[-4000:]
    answer = json.loads(run.stdout)
    assert answer["action"]["action"] in range(4) and answer["action"]["model_version"] == 0
    assert sum(answer["distribution"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["raw"]["action"] in range(4)
    assert answer["denied"] == 403


@pytest.mark.parametrize("jar", JAVA_CLASSPATH_JARS)
def test_every_classpath_jar_comes_from_a_listed_debian_package(jar: str) -> None:
    listed = Path(__file__).resolve().parents[2] / ".ci" / "packages.txt"
    packages = {
        line.split()[0] for line in listed.read_text().splitlines() if line.strip() and line[0] != "#"
    }
    owner = {
        "jackson-databind.jar": "libjackson2-databind-java",
        "jackson-core.jar": "libjackson2-core-java",
        "jackson-annotations.jar": "libjackson2-annotations-java",
        "jsr305.jar": "libjsr305-java",
        "geronimo-annotation-1.3-spec.jar": "libgeronimo-annotation-1.3-spec-java",
    }[jar]
    assert owner in packages, f"{owner} (it provides {jar}) is missing from .ci/packages.txt"
